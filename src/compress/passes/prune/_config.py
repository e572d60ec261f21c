"""Config fields shared by the unstructured / N:M pruners (magnitude, Wanda, SparseGPT), and the one place
that turns a score matrix into the pruned layer, so every pruner masks and marks layers the same way.

Its own module because a pass module never imports another pass module (DESIGN: layer rules).
"""

from __future__ import annotations

from pydantic import Field, field_validator
from torch import Tensor, nn

from compress.core.errors import CompressError
from compress.core.sparsity import SPARSITY_ATTR, NMPattern, check_sparsity, mask_for
from compress.core.targets import matches
from compress.passes.base import PassConfig


class PruneConfig(PassConfig):
    """How much to prune and in which shape."""

    sparsity: float = Field(0.5, ge=0, lt=1)
    """Fraction of each row's weights removed (ignored with ``pattern``, which fixes it at 1 - N/M)."""
    pattern: str | None = None
    """``N:M`` semi-structured sparsity (``2:4``: keep 2 of every 4 consecutive inputs), or unstructured."""
    per_layer: dict[str, float] = {}
    """Layer name pattern → sparsity (glob or ``re:``), first match wins; other layers use ``sparsity``."""

    @field_validator("pattern")
    @classmethod
    def _pattern_parses(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(NMPattern.parse(value))
        except CompressError as error:
            raise ValueError(str(error)) from None

    @field_validator("per_layer")
    @classmethod
    def _per_layer_valid(cls, value: dict[str, float]) -> dict[str, float]:
        for pattern, sparsity in value.items():
            try:
                check_sparsity(float(sparsity))
            except CompressError as error:
                raise ValueError(f"{pattern}: {error}") from None
        return value

    @property
    def nm(self) -> NMPattern | None:
        return None if self.pattern is None else NMPattern.parse(self.pattern)

    def sparsity_for(self, name: str) -> float:
        for pattern, sparsity in self.per_layer.items():
            if matches(name, pattern):
                return float(sparsity)
        return self.sparsity

    def check_prunable(self, name: str, linear: nn.Linear) -> None:
        if self.nm is not None:
            if self.per_layer:
                raise CompressError("per-layer sparsity does not combine with an N:M pattern (N:M fixes it)")
            self.nm.check_layer(name, linear.in_features)

    def tag(self) -> str:
        if self.nm is not None:
            return f"{self.nm.n}of{self.nm.m}"
        return f"sp{round(self.sparsity * 100)}"


def apply_mask(name: str, linear: nn.Linear, keep: Tensor, config: PruneConfig) -> nn.Linear:
    """Zero the weights outside ``keep`` in place and mark the layer as sparse (for later stages and export)."""
    with_mask = linear.weight.detach() * keep.to(linear.weight.dtype)
    linear.weight.data.copy_(with_mask)
    setattr(linear, SPARSITY_ATTR, "unstructured" if config.nm is None else str(config.nm))
    return linear


def prune_by_score(name: str, linear: nn.Linear, scores: Tensor, config: PruneConfig) -> nn.Linear:
    """Prune the lowest-scoring weights of each row (or keep the top N of every M) and mark the layer."""
    keep = mask_for(scores, config.sparsity_for(name), config.nm)
    return apply_mask(name, linear, keep, config)
