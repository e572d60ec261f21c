"""Pure tensor math for weight sparsity: patterns, masks from scores, and the bitmask storage contract.

Two mask shapes, both chosen *per output row* so every row ends with exactly the sparsity asked for:

- unstructured at sparsity ``s``: in each row, the ``round(s · in)`` entries with the lowest score are
  pruned (a per-row budget, as Wanda found works better for LLMs than one threshold per layer);
- ``N:M`` (e.g. ``2:4``): in every run of ``M`` consecutive input columns of a row, exactly the ``N``
  entries with the highest score are kept — what sparse tensor cores (and ``sparse-24`` formats) need.

Storage follows compressed-tensors' ``sparse-bitmask`` layout for a weight with prefix ``P``:
``P.shape`` (int64 ``[2]``), ``P.compressed`` (the kept values, row-major, 1-D, in the weight dtype),
``P.bitmask`` (uint8 ``[rows, ceil(cols / 8)]``, bit ``j % 8`` of byte ``j // 8`` is column ``j``,
least significant bit first) and ``P.row_offsets`` (int64 ``[rows]``: index of each row's first value).
A kept weight that happens to be exactly zero is stored as a value (the mask, not the value, decides).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from compress.core.errors import CompressError

BITMASK_SUFFIXES = ("shape", "compressed", "bitmask", "row_offsets")

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive input columns in each row."""

    n: int
    m: int

    @classmethod
    def parse(cls, text: str) -> NMPattern:
        match = _PATTERN.match(text)
        if match is None:
            raise CompressError(f"sparsity pattern {text!r} is not of the form N:M (e.g. 2:4)")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise CompressError(f"sparsity pattern {text!r} must keep between 1 and M-1 of every M weights")
        return cls(n, m)

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def check_layer(self, name: str, in_features: int) -> None:
        if in_features % self.m:
            raise CompressError(f"layer {name} has {in_features} inputs, which {self} sparsity cannot divide "
                                f"into runs of {self.m}")


def check_sparsity(value: float) -> float:
    if not 0 <= value < 1:
        raise CompressError(f"sparsity must be in [0, 1), got {value}")
    return value


def pruned_per_row(in_features: int, sparsity: float) -> int:
    """How many weights of a row unstructured pruning at ``sparsity`` removes."""
    return int(round(check_sparsity(sparsity) * in_features))


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask (bool, scores' shape) pruning the ``round(s · in)`` lowest scores of every row."""
    k = pruned_per_row(scores.shape[-1], sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        drop = torch.topk(scores, k, dim=-1, largest=False).indices
        keep.scatter_(-1, drop, False)
    return keep


def nm_mask(scores: Tensor, pattern: NMPattern) -> Tensor:
    """Keep-mask holding exactly ``n`` of every ``m`` consecutive columns (the ``n`` highest scores)."""
    rows, cols = scores.shape
    if cols % pattern.m:
        raise CompressError(f"{cols} columns cannot be split into runs of {pattern.m} for {pattern} sparsity")
    grouped = scores.reshape(rows, cols // pattern.m, pattern.m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(grouped, pattern.n, dim=-1).indices, True)
    return keep.reshape(rows, cols)


def mask_for(scores: Tensor, sparsity: float, pattern: NMPattern | None) -> Tensor:
    return nm_mask(scores, pattern) if pattern is not None else row_mask(scores, sparsity)


def pack_bitmask(keep: Tensor) -> Tensor:
    """bool ``[rows, cols]`` → uint8 ``[rows, ceil(cols / 8)]``, least significant bit first."""
    rows, cols = keep.shape
    pad = -cols % 8
    bits = torch.nn.functional.pad(keep.to(torch.uint8), (0, pad)).reshape(rows, -1, 8)
    weights = (2 ** torch.arange(8, dtype=torch.int32, device=keep.device)).to(torch.uint8)
    return (bits * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_bitmask(packed: Tensor, cols: int) -> Tensor:
    """uint8 ``[rows, ceil(cols / 8)]`` → bool ``[rows, cols]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def to_bitmask(weight: Tensor, keep: Tensor | None = None) -> dict[str, Tensor]:
    """The four ``sparse-bitmask`` tensors of a 2-D weight (suffix → tensor); ``keep`` defaults to ``w != 0``."""
    if weight.ndim != 2:
        raise CompressError(f"bitmask storage needs a 2-D weight, got shape {tuple(weight.shape)}")
    keep = weight != 0 if keep is None else keep
    counts = keep.sum(dim=1)
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "compressed": weight[keep].contiguous(),
        "bitmask": pack_bitmask(keep).contiguous(),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64).contiguous(),
    }


def from_bitmask(parts: dict[str, Tensor], name: str = "weight") -> Tensor:
    """The dense weight back from its ``sparse-bitmask`` tensors, validated (``CompressError`` if they disagree)."""
    missing = [s for s in BITMASK_SUFFIXES if s not in parts]
    if missing:
        raise CompressError(f"sparse tensor {name} lacks its {missing[0]} part")
    shape = parts["shape"]
    if shape.ndim != 1 or shape.numel() != 2 or shape.dtype.is_floating_point or bool((shape <= 0).any()):
        raise CompressError(f"sparse tensor {name}.shape must hold two positive integers")
    rows, cols = (int(v) for v in shape.tolist())
    bitmask, values, offsets = parts["bitmask"], parts["compressed"], parts["row_offsets"]
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise CompressError(f"sparse tensor {name}.bitmask must be uint8 of shape [{rows}, {(cols + 7) // 8}]")
    keep = unpack_bitmask(bitmask, cols)
    count = int(keep.sum())
    if values.ndim != 1 or values.numel() != count or not values.dtype.is_floating_point:
        raise CompressError(f"sparse tensor {name}.compressed must hold {count} float values, one per set bit")
    row_counts = keep.sum(dim=1)
    if offsets.shape != (rows,) or not torch.equal(offsets.to(torch.int64), torch.cumsum(row_counts, 0) - row_counts):
        raise CompressError(f"sparse tensor {name}.row_offsets disagrees with its bitmask")
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[keep] = values
    return dense


def structure_of(keep: Tensor, pattern: NMPattern | None) -> str:
    return "unstructured" if pattern is None else str(pattern)
