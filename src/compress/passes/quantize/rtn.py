"""Round-to-nearest weight quantization: no calibration, min/max scales per group.

The baseline every other method must beat, and the fastest way to a packed checkpoint.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from compress.core.observers import choose_qparams
from compress.kernels.quant_linear import QuantLinear
from compress.passes.base import PASSES, LayerPass
from compress.passes.quantize._config import WeightQuantConfig


class RTNConfig(WeightQuantConfig):
    method: Literal["rtn"] = "rtn"


@PASSES.register("rtn")
class RTNPass(LayerPass):
    """Quantize each weight with min/max group scales, independently of any data."""

    config_cls = RTNConfig
    needs_calibration = False
    config: RTNConfig

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        self.config.scheme_for(linear.in_features).check_layer(name, linear.in_features)

    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        scheme = self.config.scheme_for(linear.in_features)
        if self.config.observer == "minmax":
            quantized = QuantLinear.from_linear(linear, scheme)
        else:
            scale, zero_point = choose_qparams(linear.weight.detach(), scheme, observer=self.config.observer)
            quantized = QuantLinear.from_linear(linear, scheme, scale=scale, zero_point=zero_point)
        # zero lies in every group's range, so an earlier stage's pruned weights stay exactly zero: the layer's
        # record keeps its sparsity pattern (the observer is the default ``record_facts``)
        return quantized

    def quantizes(self) -> bool:
        return True

    def describe(self) -> str:
        return self.config.scheme.tag
