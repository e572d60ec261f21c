"""Round-to-nearest weight quantization: no calibration, min/max scales per group.

The baseline every other method must beat, and the fastest way to a packed checkpoint.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator
from torch import nn

from compress.core.observers import choose_qparams
from compress.core.scheme import QuantScheme
from compress.kernels.quant_linear import QuantLinear
from compress.passes.base import PASSES, LayerPass, PassConfig


class WeightQuantConfig(PassConfig):
    """Fields shared by every weight-only integer quantizer."""

    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 128
    symmetric: bool = True
    observer: Literal["minmax", "mse"] = "minmax"
    """How group scales are chosen: full min/max range, or the clip ratio minimising the squared error."""

    @field_validator("group_size")
    @classmethod
    def _group_size_valid(cls, value: int) -> int:
        if value != -1 and value <= 0:
            raise ValueError("group_size must be -1 (per channel) or a positive number of input columns")
        return value

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)


class RTNConfig(WeightQuantConfig):
    method: Literal["rtn"] = "rtn"


@PASSES.register("rtn")
class RTNPass(LayerPass):
    """Quantize each weight with min/max group scales, independently of any data."""

    config_cls = RTNConfig
    needs_calibration = False
    config: RTNConfig

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        self.config.scheme.check_layer(name, linear.in_features)

    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        scheme = self.config.scheme
        if self.config.observer == "minmax":
            return QuantLinear.from_linear(linear, scheme)
        scale, zero_point = choose_qparams(linear.weight.detach(), scheme, observer=self.config.observer)
        return QuantLinear.from_linear(linear, scheme, scale=scale, zero_point=zero_point)

    def describe(self) -> str:
        return self.config.scheme.tag
