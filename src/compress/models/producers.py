"""Which module produces the input of a group of linears: the model-structure knowledge group passes need.

A scaling method (AWQ, SmoothQuant) multiplies a group's input channels by ``s`` and its weights' columns
by ``1/s``; the ``s`` must be folded into whatever computes that input, so the exported model computes the
same function. Two kinds of producer exist (``compress.passes.groups``): a norm (``normalize(x) · weight``)
and a previous linear whose output reaches the group channel by channel (v_proj → o_proj through attention,
up_proj → down_proj through ``act(gate) · up``, fc1 → fc2 through a ReLU). Norms can be learned from a
forward pass (their output *is* the group's input tensor); linear producers cannot (attention and the MLP
product sit between), so they come from the per-family table below, written with transformers' module
names relative to a decoder block, as AWQ maps them.

Every entry is checked against the model before it is used: a norm entry only where the probing forward
saw that norm's output reach exactly those linears, a linear entry only where the output rows match the
readers' width (no v_proj → o_proj under GQA, where V has fewer channels than o_proj reads). Families
without an entry fall back to the learned norm, which the sweep accepts only after checking that a fold
leaves the block's output unchanged (a post-norm block also adds the norm's output to its residual; Gemma's
``1 + weight`` norms do not scale with their weight). Where nothing is found the caller refuses in one
sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from compress.core.errors import CompressError

__all__ = ["ProducerSpec", "TABLE_FAMILIES", "norm_like", "resolve_producer", "linear_producers", "no_producer"]


@dataclass(frozen=True)
class ProducerSpec:
    """A resolved producer, named relative to its block."""

    name: str
    kind: Literal["norm", "linear"]
    rows: tuple[int, int] | None = None
    learned: bool = False
    """True when found by matching tensors in the forward pass rather than from the family table."""


@dataclass(frozen=True)
class _Entry:
    producer: str
    kind: Literal["norm", "linear"]
    readers: frozenset[str]
    when: Callable[[object], bool] | None = None
    rows: Callable[[object], tuple[int, int]] | None = None


def _entry(producer: str, kind: Literal["norm", "linear"], *readers: str, when=None, rows=None) -> _Entry:
    return _Entry(producer, kind, frozenset(readers), when, rows)


def _relu(config) -> bool:
    return getattr(config, "activation_function", None) == "relu"


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = (
    _entry("input_layernorm", "norm", *_ATTN),
    _entry("self_attn.v_proj", "linear", "self_attn.o_proj"),
    _entry("post_attention_layernorm", "norm", "mlp.gate_proj", "mlp.up_proj"),
    _entry("mlp.up_proj", "linear", "mlp.down_proj"),
)
_FALCON_QKV, _FALCON_UP = "self_attention.query_key_value", "mlp.dense_h_to_4h"
_TABLE: dict[str, tuple[_Entry, ...]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), _LLAMA),
    "opt": (
        _entry("self_attn_layer_norm", "norm", *_ATTN),
        _entry("self_attn.v_proj", "linear", "self_attn.out_proj"),
        _entry("final_layer_norm", "norm", "fc1"),
        _entry("fc1", "linear", "fc2", when=_relu),
    ),
    "gpt2": (  # Conv1D converted to Linear; c_attn's rows [2E, 3E) are V; c_fc → c_proj has a GELU between
        _entry("ln_1", "norm", "attn.c_attn"),
        _entry("attn.c_attn", "linear", "attn.c_proj", rows=lambda c: (2 * c.n_embd, 3 * c.n_embd)),
        _entry("ln_2", "norm", "mlp.c_fc"),
    ),
    "phi": (  # attention and MLP read the same norm output (parallel block)
        _entry("input_layernorm", "norm", *_ATTN, "mlp.fc1"),
        _entry("self_attn.v_proj", "linear", "self_attn.dense"),
    ),
    "falcon": (  # which norms exist depends on new_decoder_architecture / parallel_attn / num_ln_in_parallel_attn
        _entry("ln_attn", "norm", _FALCON_QKV),
        _entry("ln_mlp", "norm", _FALCON_UP),
        _entry("input_layernorm", "norm", _FALCON_QKV, _FALCON_UP),
        _entry("input_layernorm", "norm", _FALCON_QKV),
        _entry("post_attention_layernorm", "norm", _FALCON_UP),
    ),
    "gpt_neox": (  # query_key_value interleaves q/k/v per head, so V is no contiguous row range: no linear entry
        _entry("input_layernorm", "norm", "attention.query_key_value"),
        _entry("post_attention_layernorm", "norm", "mlp.dense_h_to_4h"),
    ),
}
TABLE_FAMILIES = tuple(sorted(_TABLE))


def norm_like(block: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``block`` that may be a norm producer: leaves with a 1-D weight (LayerNorm, RMSNorm...)."""
    found = {}
    for name, module in block.named_modules():
        weight = getattr(module, "weight", None)
        if name and not any(True for _ in module.children()) and not isinstance(module, (nn.Linear, nn.Embedding)) \
                and isinstance(weight, Tensor) and weight.dim() == 1:
            found[name] = module
    return found


def resolve_producer(config, block: nn.Module, readers: Sequence[str], *,
                     learned_norm: str | None = None) -> ProducerSpec | None:
    """The producer of the tensor that ``readers`` (every linear of ``block`` reading it, relative names)
    read, or None when nothing foldable produces it.

    ``learned_norm``: the norm-like module of the block whose output the probing forward saw arrive at the
    readers. Used as a fallback where the table has no entry, and then marked ``learned``: the caller must
    check that folding a scale into it leaves the block's function unchanged (``pipeline.groups.folds_exactly``),
    since a forward cannot show where else the norm's output goes (post-norm blocks add it to the residual)."""
    wanted = frozenset(readers)
    for entry in _TABLE.get(str(getattr(config, "model_type", None)), ()):
        if entry.readers != wanted or (entry.when is not None and not entry.when(config)):
            continue
        try:
            module = block.get_submodule(entry.producer)
        except AttributeError:
            continue
        if entry.kind == "norm":
            if learned_norm == entry.producer:  # the forward confirmed it: this variant routes the norm here
                return ProducerSpec(entry.producer, "norm")
            continue
        rows = entry.rows(config) if entry.rows is not None else None
        if _linear_fits(module, rows, [block.get_submodule(r) for r in readers]):
            return ProducerSpec(entry.producer, "linear", rows)
    if learned_norm is not None:
        return ProducerSpec(learned_norm, "norm", learned=True)
    return None


def _linear_fits(module: nn.Module, rows: tuple[int, int] | None, readers: list[nn.Module]) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    start, stop = rows if rows is not None else (0, module.out_features)
    return 0 <= start < stop <= module.out_features and all(
        getattr(r, "in_features", None) == stop - start for r in readers)


def linear_producers(config, model: nn.Module, block_path: str, blocks: nn.ModuleList) -> dict[str, str]:
    """Full reader name → full name of the linear the family table says produces its input, for every
    block: what the stage-order check needs to know that a group pass also rewrites those layers. Works on
    a model built on the meta device (shapes only)."""
    found: dict[str, str] = {}
    for index, block in enumerate(blocks):
        prefix = f"{block_path}.{index}"
        for entry in _TABLE.get(str(getattr(config, "model_type", None)), ()):
            if entry.kind != "linear" or (entry.when is not None and not entry.when(config)):
                continue
            try:
                module = block.get_submodule(entry.producer)
                readers = [block.get_submodule(r) for r in sorted(entry.readers)]
            except AttributeError:
                continue
            if _linear_fits(module, entry.rows(config) if entry.rows else None, readers):
                found.update({f"{prefix}.{r}": f"{prefix}.{entry.producer}" for r in entry.readers})
    return found


def no_producer(method: str, names: Sequence[str], family: str) -> CompressError:
    """The one sentence a group pass that needs a producer stops with."""
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return CompressError(f"method {method} folds its transform into the module producing the input of {listed}, "
                         f"and no norm or linear of this {family} model produces it directly (known families: "
                         f"{', '.join(TABLE_FAMILIES)}); leave these layers out with ignore patterns")
