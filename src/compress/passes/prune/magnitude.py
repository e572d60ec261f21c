"""Magnitude pruning: drop the smallest ``|W|`` of each row. No data; the baseline calibrated pruners beat."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from compress.passes.base import PASSES, LayerPass
from compress.passes.prune._config import PruneConfig, RecordsSparsity, prune_by_score


class MagnitudeConfig(PruneConfig):
    method: Literal["magnitude"] = "magnitude"


@PASSES.register("magnitude")
class MagnitudePass(RecordsSparsity, LayerPass):
    config_cls = MagnitudeConfig
    needs_calibration = False
    config: MagnitudeConfig

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        self.config.check_prunable(name, linear)

    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        return prune_by_score(name, linear, linear.weight.detach().abs().float(), self.config)

    def describe(self) -> str:
        return f"magnitude-{self.config.tag()}"
