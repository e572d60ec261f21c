"""Wanda (Sun et al., 2023): prune by ``|W_ij| · ‖X_j‖₂``, per output row, with no weight update.

The input norm makes a small weight on a loud input channel count as much as a large weight on a quiet
one; it needs only one vector of calibration statistics per layer (``InputNormStats``), so it is the
cheapest calibrated pruner.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from compress.calibrate.stats import InputNormStats
from compress.core.errors import CompressError
from compress.passes.base import PASSES, LayerPass
from compress.passes.prune._config import PruneConfig, RecordsSparsity, prune_by_score


class WandaConfig(PruneConfig):
    method: Literal["wanda"] = "wanda"


@PASSES.register("wanda")
class WandaPass(RecordsSparsity, LayerPass):
    config_cls = WandaConfig
    needs_calibration = True
    config: WandaConfig

    def make_stats(self, name: str, linear: nn.Linear) -> InputNormStats:
        return InputNormStats(linear.in_features)

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        self.config.check_prunable(name, linear)

    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        if stats is None or not getattr(stats, "tokens", 0):
            raise CompressError(f"Wanda needs calibration inputs for layer {name}, and saw none")
        weight = linear.weight.detach()
        norms = stats.sq_norms.to(weight.device).sqrt()
        return prune_by_score(name, linear, weight.abs().float() * norms.unsqueeze(0), self.config)

    def describe(self) -> str:
        return f"wanda-{self.config.tag()}"
