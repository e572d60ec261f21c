"""Config fields shared by the unstructured / N:M pruners (magnitude, Wanda, SparseGPT), the one place
that turns a score matrix into the pruned layer, and the sparsity fact every pruner records, so every
pruner masks and records layers the same way.

Its own module because a pass module never imports another pass module (DESIGN: layer rules).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from compress.core.errors import CompressError
from compress.core.sparsity import NMPattern, check_sparsity, mask_for
from compress.core.targets import check_pattern, matches
from compress.passes.base import Pass, PassConfig


class PruneConfig(PassConfig):
    """How much to prune and in which shape. Options that could not all take effect are refused, never
    silently dropped: ``sparsity`` other than 1 - N/M with a ``pattern``, ``per_layer`` with a ``pattern``,
    and quantization options (``group_size``, ``symmetric``) without ``bits`` on a pruner that has them."""

    sparsity: float = Field(0.5, ge=0, lt=1)
    """Fraction of each row's weights removed. With ``pattern`` it is 1 - N/M, filled in when not given (so
    the recorded recipe says what was done) and refused when given as anything else."""
    pattern: str | None = None
    """``N:M`` semi-structured sparsity (``2:4``: keep 2 of every 4 consecutive inputs), or unstructured."""
    per_layer: dict[str, float] = {}
    """Layer name pattern → sparsity (glob or ``re:``), first match wins; other layers use ``sparsity``."""

    @model_validator(mode="before")
    @classmethod
    def _one_shape(cls, data: Any) -> Any:
        """N:M fixes the sparsity of every layer, so a different sparsity or per-layer map cannot apply."""
        if not isinstance(data, dict) or data.get("pattern") is None:
            return data
        try:
            nm = NMPattern.parse(str(data["pattern"]))
        except CompressError:
            return data  # the field validator names it
        if data.get("per_layer"):
            raise ValueError(f"per_layer sparsities (--per-layer-sparsity) do not combine with pattern {nm} "
                             f"(--pattern), which fixes every layer's sparsity at {nm.sparsity:g}; give one of them")
        given = data.get("sparsity")
        if given is None:
            return {**data, "sparsity": nm.sparsity}
        if isinstance(given, int | float) and not isinstance(given, bool) and abs(given - nm.sparsity) > 1e-9:
            raise ValueError(f"sparsity {given:g} (--sparsity) conflicts with pattern {nm} (--pattern), which "
                             f"keeps {nm.n} of every {nm.m} weights, a sparsity of {nm.sparsity:g}; give one of them")
        return data

    @model_validator(mode="after")
    def _quantize_options_need_bits(self) -> PruneConfig:
        """A pruner that can also quantize (SparseGPT's ``bits``) ignores the scheme options without bits."""
        fields = type(self).model_fields
        if "bits" not in fields or getattr(self, "bits", None) is not None:
            return self
        for name, flag in (("group_size", "--group-size"), ("symmetric", "--sym/--asym")):
            if name in fields and getattr(self, name) != fields[name].default:
                raise ValueError(f"{name} ({flag}) applies only when bits (--bits) quantizes the kept weights; "
                                 "give bits or drop it")
        return self

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
                check_pattern(pattern)
            except CompressError as error:
                raise ValueError(str(error)) from None
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
        if self.nm is not None:  # per_layer with a pattern is refused when the config is built
            self.nm.check_layer(name, linear.in_features)

    @property
    def structure(self) -> str:
        """The pattern a layer's record names: ``unstructured`` or ``N:M``."""
        return "unstructured" if self.nm is None else str(self.nm)

    def tag(self) -> str:
        if self.nm is not None:
            return f"{self.nm.n}of{self.nm.m}"
        return f"sp{round(self.sparsity * 100)}"


class RecordsSparsity(Pass):
    """Mixed into a pruner: every layer it returns is recorded with the config's pattern (for later stages
    and the export), besides the observer of a layer it also quantized."""

    config: PruneConfig

    def record_facts(self, name: str, module: nn.Module) -> dict[str, Any]:
        return {**super().record_facts(name, module), "sparsity": self.config.structure}


def apply_mask(name: str, linear: nn.Linear, keep: Tensor, config: PruneConfig) -> nn.Linear:
    """Zero the weights outside ``keep`` in place (the pass's ``record_facts`` names the pattern)."""
    with_mask = linear.weight.detach() * keep.to(linear.weight.dtype)
    linear.weight.data.copy_(with_mask)
    return linear


def prune_by_score(name: str, linear: nn.Linear, scores: Tensor, config: PruneConfig) -> nn.Linear:
    """Prune the lowest-scoring weights of each row (or keep the top N of every M)."""
    keep = mask_for(scores, config.sparsity_for(name), config.nm)
    return apply_mask(name, linear, keep, config)
