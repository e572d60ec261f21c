"""SmoothQuant: activation outliers migrated into the weights before W8A8 quantization (the plumbing; the
math is in smoothquant_math).

Per group of layers reading one tensor (q/k/v after the attention norm, gate/up after the MLP norm, o_proj
after v_proj where V is as wide as o_proj's input, down_proj after up_proj; ``compress.models.producers``):

1. the sweep feeds an ``InputAbsMaxStats`` with the group's input: ``max|x|`` per channel over every
   calibration token, and with ``alpha: auto`` a seeded uniform sample of at most ``max_tokens`` rows;
2. ``s = max|X|^α / max|W|^(1-α)`` per input channel (the max over the rows of every reader), with a fixed
   ``α`` or, with ``alpha: auto``, the candidate of the grid (or no smoothing) whose W8A8 output error on
   the sampled rows is lowest (``smoothquant_math.search_alpha``);
3. ``s`` is folded into the producer (its output ``· 1/s``: a norm's weight and bias, or the previous
   linear's rows) and every reader (its input columns ``· s``) by ``passes.groups.fold_scale_``: before
   quantization the model computes what it computed, up to float rounding.

Nothing is quantized here (``quantizes()`` is False): a later stage, RTN or GPTQ with ``activations:
int8-dynamic``, quantizes the smoothed weights, and its layers' inputs are the smoothed activations. The
stage rewrites its layers and their producers, so it must come before any stage quantizing them
(``pipeline.stage_order``, through ``rewrites_producers``). Scaling a linear producer's output rows commutes
with its own per-output-channel quantization, so smoothing o_proj (into v_proj) and down_proj (into
up_proj) costs those producers nothing under W8A8.

A group with no foldable producer (o_proj under GQA, where V is narrower than o_proj's input) is left as it
is; which ones is logged once per model (info). A stage in which no targeted group has a producer is
refused: it would change nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from compress.calibrate.stats import InputAbsMaxStats
from compress.core.errors import CompressError
from compress.passes.base import PASSES, GroupPass, PassConfig
from compress.passes.groups import Group, fold_scale_
from compress.passes.quantize.smoothquant_math import search_alpha, smooth_scale

logger = logging.getLogger("compress")


class SmoothQuantConfig(PassConfig):
    """SmoothQuant options. It quantizes nothing itself: put a W8A8 quantize stage after it."""

    method: Literal["smoothquant"] = "smoothquant"
    alpha: float | Literal["auto"] = 0.5
    """Migration strength in ``[0, 1]`` (0.5: the paper's default), or ``auto``: per group, the grid value
    (or no smoothing) with the lowest W8A8 output error on the sampled calibration rows."""
    grid: int = Field(20, ge=1, le=1000)
    """``alpha: auto`` tries ``α = 0, 1/grid, ..., 1`` (an even grid includes 0.5)."""
    max_tokens: int = Field(4096, ge=1)
    """``alpha: auto``: input rows sampled per group (uniformly over all calibration tokens, seeded) to
    score candidates; ``max|x|`` uses every token."""
    seed: int = 0
    """Seed of that sample: the same inputs give the same rows, hence the same bytes."""

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha_valid(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, bool):
            raise ValueError("alpha must be a number in [0, 1] or auto")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a number in [0, 1] or auto, got {value!r}") from None
        if not 0.0 <= number <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1] or auto, got {value!r}")
        return number


def _block_of(name: str) -> str | None:
    """The block a layer sits in (``model.layers.3.mlp.up_proj`` → ``model.layers.3``)."""
    parts = name.split(".")
    at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return None if at is None else ".".join(parts[: at + 1])


@PASSES.register("smoothquant")
class SmoothQuantPass(GroupPass):
    """Per-channel smoothing scales folded into each group's producer; the layers stay dense."""

    config_cls = SmoothQuantConfig
    needs_producer: ClassVar[bool] = False
    takes_stage_flags: ClassVar[bool] = False
    """The command line's quantizer flags (``--method``, ``--bits``, ``--ignore``) pass it by: ``--smoothquant``
    names the stage (``compress.cli._smoothquant``)."""
    config: SmoothQuantConfig

    def __init__(self, config: SmoothQuantConfig) -> None:
        super().__init__(config)
        self._targets: set[str] = set()
        self._done: set[str] = set()
        self._first_block: str | None = None
        self._bare: list[str] = []
        """First layer of each group of the first block that had no producer."""
        self._any_producer = False
        self._reported = False

    def describe(self) -> str:
        alpha = self.config.alpha
        return "sq-auto" if alpha == "auto" else f"sq{alpha:g}"

    def make_stats(self, name: str, linear: nn.Linear) -> InputAbsMaxStats:
        rows = self.config.max_tokens if self.config.alpha == "auto" else 0
        return InputAbsMaxStats(linear.in_features, rows, self.config.seed)

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        self._targets.add(name)

    def apply_group(self, group: Group, stats: Mapping[str, Any]) -> Mapping[str, nn.Module]:
        self._account(group)
        if group.producer is None:
            return {}
        stat = stats.get(group.names[0])
        if not isinstance(stat, InputAbsMaxStats) or stat.tokens == 0:
            raise CompressError(f"SmoothQuant needs calibration inputs for layer {group.names[0]}, got none")
        weights = [layer.weight for layer in group.layers]
        device = weights[0].device
        abs_max = stat.abs_max.to(device)
        if self.config.alpha == "auto":
            found = search_alpha(weights, stat.rows.to(device=device, dtype=torch.float32), abs_max,
                                 points=self.config.grid)
            logger.debug("smoothquant %s: alpha %s, W8A8 output error %.6g (unsmoothed %.6g)", group.names[0],
                         found.alpha, found.losses[found.alpha], found.losses[None])
            if found.alpha is None:  # not smoothing scored best
                return {}
            scale = found.scale
        else:
            scale = smooth_scale(abs_max, weights, float(self.config.alpha))
        fold_scale_(group, scale.reciprocal())  # producer output · 1/s, reader columns · s
        return {}

    def _account(self, group: Group) -> None:
        """Track producers per block: log once which groups have none, refuse when none has one."""
        block = _block_of(group.names[0])
        if self._first_block is None:
            self._first_block = block
        if not self._reported and block != self._first_block:
            self._report()
        if group.producer is not None:
            self._any_producer = True
        elif block == self._first_block:
            self._bare.append(group.names[0])
        self._done.update(group.names)
        if not self._reported and self._targets and self._done >= self._targets:
            self._report()

    def _report(self) -> None:
        self._reported = True
        if not self._any_producer:
            first = self._bare[0] if self._bare else "the targeted layers"
            raise CompressError(
                f"method smoothquant found no norm or linear producing the input of any targeted layer (first: "
                f"{first}) to fold its scales into, so it would change nothing; target layers whose input a norm "
                "or linear produces, or drop the smoothquant stage")
        if self._bare:
            listed = ", ".join(self._bare[:3]) + (f" and {len(self._bare) - 3} more" if len(self._bare) > 3 else "")
            logger.info("smoothquant: nothing foldable produces the input of %s (nor of the same layers in the other "
                        "blocks); those layers are quantized unsmoothed", listed)
