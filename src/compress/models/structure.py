"""Which modules of a block are its MLP and attention projections, and how a smaller shape is written to the config.

Structured pruning changes the model's shape, so it needs what ``blocks.py`` avoids: names. They live here, in
one table per family, so that the pass sees ``nn.Linear`` only and a new family is one row. A family supports
a target only where the pruned shape is expressible by its config alone: removing heads needs an explicit
``head_dim`` (Llama/Qwen2/Mistral read it from the config; OPT, GPT-2 and Phi derive it from
``hidden_size / num_heads``, so their heads cannot be removed without changing ``head_dim``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from compress.core.errors import CompressError
from compress.models.blocks import find_blocks

__all__ = ["Layout", "layout_of", "get_layer", "set_layer", "head_counts", "config_refusal", "head_refusal",
           "set_mlp_width", "set_heads", "sync_attention", "drop_blocks"]

_PER_LAYER_KEYS = ("layer_types",)
"""Config lists with one entry per block (sliding vs full attention), sliced when blocks are dropped."""
_LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


@dataclass(frozen=True)
class Layout:
    """Names, relative to a block, of the layers structured pruning edits, and the config keys it rewrites."""

    family: str
    mlp_in: tuple[str, ...]
    """Projections into the MLP's intermediate width: their output rows are the channels (gate, up)."""
    mlp_out: str
    """The projection out of it: its input columns are the channels (down)."""
    attention: tuple[str, str, str, str] | None
    """(q, k, v, o) with separate projections and a config-level ``head_dim``, or None: heads unsupported."""
    intermediate_key: str
    layers_key: str


_GATED = {"mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "mlp_out": "mlp.down_proj", "attention": _LLAMA_ATTENTION,
          "intermediate_key": "intermediate_size", "layers_key": "num_hidden_layers"}
_LAYOUTS: dict[str, Layout] = {
    **{family: Layout(family=family, **_GATED) for family in ("llama", "qwen2", "qwen3", "mistral")},
    "opt": Layout("opt", ("fc1",), "fc2", None, "ffn_dim", "num_hidden_layers"),
    "gpt_neox": Layout("gpt_neox", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", None, "intermediate_size",
                       "num_hidden_layers"),
    "phi": Layout("phi", ("mlp.fc1",), "mlp.fc2", None, "intermediate_size", "num_hidden_layers"),
    "gpt2": Layout("gpt2", ("mlp.c_fc",), "mlp.c_proj", None, "n_inner", "n_layer"),
}


def layout_of(config, target: str) -> Layout:
    """The family's layout, or one sentence saying which families support ``target``."""
    family = getattr(config, "model_type", None)
    layout = _LAYOUTS.get(str(family))
    able = sorted(name for name, lay in _LAYOUTS.items() if target != "heads" or lay.attention is not None)
    if layout is None or (target == "heads" and layout.attention is None):
        raise CompressError(f"structured pruning of {target} does not support {family} models "
                            f"(supported: {', '.join(able)})")
    return layout


def get_layer(block: nn.Module, name: str) -> nn.Linear:
    try:
        module = block.get_submodule(name)
    except AttributeError:
        raise CompressError(f"block {type(block).__name__} has no layer {name} where its family keeps it") from None
    if not isinstance(module, nn.Linear):
        raise CompressError(f"layer {name} of {type(block).__name__} is a {type(module).__name__}, not a Linear")
    return module


def set_layer(block: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, leaf, module)


def head_counts(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) as the attention modules compute them."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv, head_dim


def config_refusal(config, **changes) -> str | None:
    """Why transformers would refuse ``config`` with ``changes`` applied (its own validation, e.g. Llama's
    ``hidden_size % num_attention_heads``), or None: a pruned shape must stay loadable with no custom code."""
    data = config.to_dict()
    data.update(changes)
    try:
        type(config).from_dict(data)
    except Exception as error:  # transformers raises its own validation error types
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return (lines[-1] if lines else type(error).__name__).removeprefix("ValueError: ").rstrip(".")
    return None


def head_refusal(config) -> Callable[[int, int], str | None]:
    """``refuses(heads, kv)`` for ``StructuredPrune.head_cut``: the config's verdict on a head count."""
    head_dim = head_counts(config)[2]
    return lambda heads, kv: config_refusal(config, num_attention_heads=heads, num_key_value_heads=kv,
                                            head_dim=head_dim)


def set_mlp_width(model: nn.Module, layout: Layout, width: int) -> None:
    setattr(model.config, layout.intermediate_key, width)


def set_heads(model: nn.Module, heads: int, kv: int, head_dim: int) -> None:
    """Write the new head counts to the config, ``head_dim`` explicitly since ``hidden / heads`` no longer gives it."""
    config = model.config
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads, kv, head_dim


def sync_attention(block: nn.Module, layout: Layout, heads: int, kv: int, head_dim: int) -> None:
    """Update what a block's attention module cached from the config at construction (GQA repeat factor)."""
    assert layout.attention is not None
    attention = block.get_submodule(layout.attention[0].rpartition(".")[0])
    for key, value in (("num_key_value_groups", heads // kv), ("num_heads", heads),
                       ("num_key_value_heads", kv), ("head_dim", head_dim)):
        if isinstance(getattr(attention, key, None), int):
            setattr(attention, key, value)


def drop_blocks(model: nn.Module, layout: Layout, drop: list[int]) -> None:
    """Remove blocks ``drop``; the rest are renumbered (cache slots included) and per-layer config lists sliced."""
    path, blocks = find_blocks(model)
    keep = [i for i in range(len(blocks)) if i not in set(drop)]
    kept = nn.ModuleList([blocks[i] for i in keep])
    for index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    parent_name, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, kept)
    config = model.config
    total = getattr(config, layout.layers_key)
    for key in _PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == total:
            setattr(config, key, [value[i] for i in keep])
    setattr(config, layout.layers_key, len(keep))
