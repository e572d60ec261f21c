"""``rotate``: QuaRot-style offline rotations (Ashkboos et al. 2024; SpinQuant fuses the same way).

Exact before quantization, with no runtime op, so the export is an ordinary checkpoint of the same
architecture:

1. every RMSNorm's weight ``g`` is folded into the linears reading its output (``W ← W · diag(g)``) and set
   to 1 (q/k/v for the attention norm, gate/up for the MLP norm, the head for the final norm);
2. the residual stream is rotated by an orthogonal ``Q`` (randomized Hadamard ``diag(±1) · H / √n``, seeded;
   ``compress.core.hadamard`` for sizes that are not a power of two): the embedding ``E ← E Q``, every
   linear reading the residual ``W ← W Q``, every linear writing into it ``W ← Qᵀ W`` (and ``b ← Qᵀ b``),
   the head ``W ← W Q``. RMSNorm commutes with ``Q`` once its weight is 1 (``rms(xQ) = rms(x)``);
3. each attention head's value/output pair is rotated by a Hadamard ``H_d`` of order ``head_dim``: the rows
   of each KV head of ``v_proj`` ``← H_dᵀ W_v`` (and its bias), the columns of each query head of
   ``o_proj`` ``← W_o H_d``. Exact under GQA: every query head sharing a KV head undoes the same rotation.

The rotated weights have their outlier channels spread over all channels, so a quantizer after this
stage (``rtn``, ``gptq``, ``awq``) loses less. No online rotation (QuaRot's Hadamard before ``down_proj``
and across heads) is done: it needs an op at inference that a plain checkpoint cannot express.

Every product is computed in float64 and rounded once into the weight's dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import field_validator
from torch import Tensor, nn

from compress.core.errors import CompressError
from compress.core.hadamard import hadamard_kind, orthogonal, randomized_hadamard
from compress.passes.base import PASSES, PassConfig, ResidualBlock, ResidualEnds, TransformPass

KINDS = ("hadamard",)


ONLINE_KINDS = ("online", "hadamard-online")
ONLINE_REFUSED = ("online rotations (QuaRot's Hadamard before down_proj and across heads) need an op at inference: "
                  "compressed-tensors' transform_config can express one, but transformers (5.24) loads such a "
                  "checkpoint without applying it and would compute a different model, so only the offline, fused "
                  "rotation is offered (--rotate hadamard)")
"""Why an online rotation is refused: checked against transformers' compressed-tensors loader, which applies
the quantization config but not the transform config (only vLLM applies it)."""


class RotateConfig(PassConfig):
    """A rotation stage: ``{method: rotate, kind: hadamard, seed: 0}``, before the quantize stages."""

    method: Literal["rotate"] = "rotate"
    kind: Literal["hadamard"] = "hadamard"
    """``hadamard``: the randomized Hadamard of QuaRot (a seeded random orthogonal matrix where no Hadamard
    matrix of the hidden size is built)."""
    seed: int = 0
    """Seed of the residual rotation's signs: the same seed gives the same bytes."""
    ignore: list[str] = []
    """Always empty: a rotation is exact only if every layer reading or writing the residual takes it."""

    @field_validator("kind", mode="before")
    @classmethod
    def _no_online(cls, value: object) -> object:
        if value in ONLINE_KINDS:
            raise ValueError(ONLINE_REFUSED)
        return value

    @field_validator("ignore")
    @classmethod
    def _no_ignore(cls, value: list[str]) -> list[str]:
        if value:
            raise ValueError("rotate transforms every layer reading or writing the residual stream (leaving one "
                             "out would change the model), so it takes no ignore patterns")
        return value


def _dense(module: nn.Module, what: str) -> Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise CompressError(f"rotate needs the dense float weight of {what}, which is a {type(module).__name__}")
    return weight


def _set(tensor: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        tensor.copy_(value.to(dtype=tensor.dtype, device=tensor.device))


def fold_norm_(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """``W ← W · diag(g)`` for every reader of ``norm``'s output, then ``g ← 1``: the same function."""
    g = _dense(norm, "a norm").detach().to(torch.float64)
    if getattr(norm, "bias", None) is not None:
        raise CompressError(f"rotate folds RMSNorm weights; a norm with a bias ({type(norm).__name__}) subtracts "
                            "no mean but shifts its output, which no rotation commutes with")
    for reader in readers:
        weight = _dense(reader, "a norm's reader")
        _set(weight, weight.detach().to(torch.float64) * g.to(weight.device))
    with torch.no_grad():
        norm.weight.fill_(1.0)


def rotate_inputs_(linear: nn.Module, q: Tensor) -> None:
    """A reader of the rotated residual: ``W ← W Q`` (columns)."""
    weight = _dense(linear, "a residual reader")
    _set(weight, weight.detach().to(torch.float64) @ q.to(weight.device))


def rotate_outputs_(linear: nn.Linear, q: Tensor) -> None:
    """A writer into the rotated residual: ``W ← Qᵀ W`` (rows), ``b ← Qᵀ b``."""
    weight = _dense(linear, "a residual writer")
    q = q.to(weight.device)
    _set(weight, q.T @ weight.detach().to(torch.float64))
    if linear.bias is not None:
        _set(linear.bias, q.T @ linear.bias.detach().to(torch.float64))


def rotate_value_heads_(value: nn.Linear, h: Tensor, kv_heads: int, head_dim: int) -> None:
    """Each KV head's rows of the value projection (and its bias) ``← H_dᵀ W_v``."""
    weight = _dense(value, "the value projection")
    if weight.shape[0] != kv_heads * head_dim:
        raise CompressError(f"rotate expects {kv_heads} KV heads of {head_dim} rows in the value projection, "
                            f"which has {weight.shape[0]} rows")
    h = h.to(weight.device)
    w = weight.detach().to(torch.float64).reshape(kv_heads, head_dim, -1)
    _set(weight, torch.einsum("ji,gjk->gik", h, w).reshape(weight.shape))
    if value.bias is not None:
        b = value.bias.detach().to(torch.float64).reshape(kv_heads, head_dim)
        _set(value.bias, (b @ h).reshape(-1))


def rotate_output_heads_(output: nn.Linear, h: Tensor, heads: int, head_dim: int) -> None:
    """Each query head's columns of the attention output projection ``← W_o H_d``."""
    weight = _dense(output, "the attention output projection")
    if weight.shape[1] != heads * head_dim:
        raise CompressError(f"rotate expects {heads} heads of {head_dim} columns in the attention output "
                            f"projection, which has {weight.shape[1]} columns")
    h = h.to(weight.device)
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], heads, head_dim)
    _set(weight, (w @ h).reshape(weight.shape))


@PASSES.register("rotate")
class RotatePass(TransformPass):
    """Fold the norms, rotate the residual stream by a seeded randomized Hadamard and each value/output head
    pair by a Hadamard of the head size. Data-free; the rotations are built once per size."""

    config_cls = RotateConfig
    config: RotateConfig

    def __init__(self, config: RotateConfig) -> None:
        super().__init__(config)
        self._residual: Tensor | None = None
        self._heads: dict[int, Tensor] = {}

    def describe(self) -> str:
        return self.config.kind

    def residual_rotation(self, hidden: int) -> Tensor:
        """``Q`` of order ``hidden`` (float64), the same for every block of one run."""
        if self._residual is None or self._residual.shape[0] != hidden:
            self._residual = randomized_hadamard(hidden, self.config.seed)
        return self._residual

    def head_rotation(self, head_dim: int) -> Tensor:
        """``H_d / √d`` (float64); a random orthogonal matrix seeded by the stage's seed where none is built."""
        if head_dim not in self._heads:
            self._heads[head_dim] = orthogonal(head_dim, self.config.seed)
        return self._heads[head_dim]

    def constructions(self, hidden: int, head_dim: int) -> dict[str, str]:
        """How each rotation is built (``hadamard``, ``hadamard-64x12``, ``random-orthogonal``), for logs."""
        return {"residual": hadamard_kind(hidden), "heads": hadamard_kind(head_dim)}

    def transform_ends(self, ends: ResidualEnds) -> None:
        q = self.residual_rotation(ends.embedding.weight.shape[1])
        fold_norm_(ends.final_norm, [ends.head])
        rotate_inputs_(ends.embedding, q)  # E ← E Q: rows are token vectors, as a reader's columns
        rotate_inputs_(ends.head, q)

    def transform_block(self, block: ResidualBlock) -> None:
        device = block.writers[0].weight.device  # the sweep's compute device: copied there once per block
        q = self.residual_rotation(block.writers[0].out_features).to(device)
        for norm, readers in block.norms:
            fold_norm_(norm, readers)
            for reader in readers:
                rotate_inputs_(reader, q)
        for writer in block.writers:
            rotate_outputs_(writer, q)
        h = self.head_rotation(block.head_dim).to(device)
        rotate_value_heads_(block.value, h, block.kv_heads, block.head_dim)
        rotate_output_heads_(block.output, h, block.heads, block.head_dim)
