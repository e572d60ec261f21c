"""Where the residual stream is read and written, per family: what a rotation (``method: rotate``) needs.

A rotation of the residual stream is exact only if every module that reads it or writes it takes the
rotation, and only if every norm on it commutes with a rotation once its weight is folded away. Both are
architecture facts, so they live here, one table row per family, with transformers' module names relative
to a decoder block (and to the model for the embedding, final norm and head):

- llama, mistral, qwen2, qwen3: pre-norm blocks with RMSNorm (``x / rms(x) · g``), separate q/k/v and
  gate/up projections; the residual is read by q/k/v (through ``input_layernorm``) and gate/up (through
  ``post_attention_layernorm``), written by o_proj and down_proj. Qwen3's q_norm/k_norm act on q/k's
  head-sized outputs, which the rotation leaves unchanged.

Refused, each with one sentence naming what blocks it: LayerNorm families (opt, gpt2, gpt_neox, phi,
falcon, bert: the mean subtraction and the norm bias do not commute with a rotation; QuaRot folds the mean
into the readers, not implemented here), fused projections (phi3's qkv_proj and gate_up_proj), Gemma's
``1 + weight`` norms, and every family without a row.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compress.core.errors import CompressError

__all__ = ["RotationLayout", "ROTATION_FAMILIES", "rotation_layout", "residual_ends", "block_parts", "untie_head"]


@dataclass(frozen=True)
class RotationLayout:
    """Module names of one family around the residual stream, and its attention's head counts."""

    family: str
    embedding: str
    final_norm: str
    head: str
    norms: tuple[tuple[str, tuple[str, ...]], ...]
    """Per block: each norm reading the residual with the linears reading its output."""
    writers: tuple[str, ...]
    value: str
    output: str
    heads: int
    kv_heads: int
    head_dim: int


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = {
    "embedding": "model.embed_tokens", "final_norm": "model.norm", "head": "lm_head",
    "norms": (("input_layernorm", _ATTN), ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    "writers": ("self_attn.o_proj", "mlp.down_proj"), "value": "self_attn.v_proj", "output": "self_attn.o_proj",
}
_TABLE = dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), _LLAMA)
ROTATION_FAMILIES = tuple(sorted(_TABLE))

_LAYERNORM = ("opt", "gpt2", "gpt_neox", "phi", "falcon", "bert", "gptj", "bloom")
_WHY = {
    **{family: "its LayerNorms subtract the mean and add a bias, which do not commute with a rotation (folding the "
               "mean into the readers as QuaRot does is not implemented)" for family in _LAYERNORM},
    "phi3": "it fuses q/k/v into qkv_proj and gate/up into gate_up_proj, whose parts this release does not rotate "
            "separately",
    "gemma": "its norms scale by 1 + weight, which this release does not fold",
    "gemma2": "its norms scale by 1 + weight and it has post-norms on the residual, which this release does not fold",
    "gemma3": "its norms scale by 1 + weight and it has post-norms on the residual, which this release does not fold",
}


def rotation_layout(config) -> RotationLayout:
    """The family's layout, from the config alone; one sentence naming what blocks any other family."""
    family = str(getattr(config, "model_type", None))
    row = _TABLE.get(family)
    supported = ", ".join(ROTATION_FAMILIES)
    if row is None:
        why = _WHY.get(family, "its layout around the residual stream is not in the table of "
                               "compress.models.rotation")
        raise CompressError(f"method rotate does not support {family} models: {why} (supported: {supported})")
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return RotationLayout(family=family, heads=heads, kv_heads=kv_heads, head_dim=head_dim, **row)


def _module(root: nn.Module, name: str, kind: type | None, what: str) -> nn.Module:
    try:
        module = root.get_submodule(name)
    except AttributeError:
        raise CompressError(f"method rotate expects the {what} at {name} in {type(root).__name__}, which has "
                            "none") from None
    if kind is not None and type(module) is not kind:
        raise CompressError(f"method rotate expects the {what} at {name} to be a {kind.__name__}, not a "
                            f"{type(module).__name__} (a quantized or changed layer cannot be rotated)")
    return module


def _rms_norm(root: nn.Module, name: str) -> nn.Module:
    norm = _module(root, name, None, "RMSNorm")
    weight = getattr(norm, "weight", None)
    if not type(norm).__name__.endswith("RMSNorm") or weight is None or weight.dim() != 1 \
            or getattr(norm, "bias", None) is not None:
        raise CompressError(f"method rotate folds RMSNorm weights, but {name} is a {type(norm).__name__}")
    return norm


def residual_ends(model: nn.Module, layout: RotationLayout) -> tuple[nn.Embedding, nn.Module, nn.Linear]:
    """(embedding, final norm, head) of ``model``, checked."""
    return (_module(model, layout.embedding, nn.Embedding, "token embedding"),
            _rms_norm(model, layout.final_norm), _module(model, layout.head, nn.Linear, "LM head"))


def block_parts(block: nn.Module, layout: RotationLayout) -> dict[str, nn.Module]:
    """Every module of one block the rotation touches, by name relative to the block, checked: the norms are
    RMSNorms, the projections plain ``nn.Linear``s, and no other linear reads or writes the block's residual."""
    parts: dict[str, nn.Module] = {}
    for norm, readers in layout.norms:
        parts[norm] = _rms_norm(block, norm)
        for reader in readers:
            parts[reader] = _module(block, reader, nn.Linear, "residual reader")
    for writer in layout.writers:
        parts[writer] = _module(block, writer, nn.Linear, "residual writer")
    others = [name for name, m in block.named_modules() if isinstance(m, nn.Linear) and name not in parts]
    if others:
        raise CompressError(f"method rotate does not know how block layer {others[0]} meets the residual stream, "
                            f"so it cannot rotate this {layout.family} model")
    return parts


def untie_head(model: nn.Module, layout: RotationLayout) -> bool:
    """Give the head its own weight when it shares the embedding's (folding the final norm makes them differ);
    the config says so (``tie_word_embeddings: false``), so the export stores ``lm_head.weight``. True when
    it was tied."""
    embedding, _, head = residual_ends(model, layout)
    if head.weight is not embedding.weight:
        return False
    head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        text.tie_word_embeddings = False
    return True
