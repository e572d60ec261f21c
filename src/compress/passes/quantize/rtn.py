"""Round-to-nearest weight quantization: no calibration, min/max scales per group.

The baseline every other method must beat, and the fastest way to a packed checkpoint.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from compress.codecs import quantize_linear
from compress.core.observers import choose_qparams
from compress.kernels.quant_linear import QuantLinear
from compress.passes.base import PASSES, LayerPass
from compress.passes.quantize._config import ActivationQuantConfig


class RTNConfig(ActivationQuantConfig):
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
        if scheme.input_activations is not None:  # W8A8-int8: int8 codes, inputs quantized at run time
            qparams = {} if self.config.observer == "minmax" else dict(zip(
                ("scale", "zero_point"), choose_qparams(linear.weight.detach(), scheme.weight_only,
                                                        observer=self.config.observer), strict=True))
            return quantize_linear(linear, scheme, format=self.config.storage_format, **qparams)
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
