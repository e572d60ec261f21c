"""Config fields shared by every weight-only integer quantizer (RTN, GPTQ, ...), and the activation scheme
the quantizers that solve only the weight side can add (``ActivationQuantConfig``: W8A8-int8).

Its own module because a pass module never imports another pass module (DESIGN: layer rules).
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator
from torch import nn

from compress.core.scheme import QuantScheme
from compress.passes.base import PassConfig

ACTIVATION_SCHEMES = ("none", "int8-dynamic")


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

    indivisible: Literal["error", "per-channel"] = "error"
    """A layer whose input width the group size does not divide: stop with an error (default), or quantize
    that layer per output channel instead."""

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def scheme_for(self, in_features: int) -> QuantScheme:
        """The scheme one layer gets: the configured one, or per-channel when groups do not fit and allowed."""
        scheme = self.scheme
        if self.indivisible == "per-channel" and scheme.group_size > 0 and in_features % scheme.group_size:
            return QuantScheme(bits=self.bits, group_size=-1, symmetric=self.symmetric)
        return scheme


class ActivationQuantConfig(WeightQuantConfig):
    """A weight quantizer whose layers may also quantize their inputs at run time.

    ``activations: int8-dynamic`` is W8A8-int8 (compressed-tensors' ``W8A8`` preset): the weights are solved
    as usual at 8 bits per output channel, symmetric; the inputs are quantized per token when the layer
    runs, so nothing about them is calibrated. Layers are stored ``int-quantized``."""

    activations: Literal["none", "int8-dynamic"] = "none"

    @model_validator(mode="after")
    def _w8a8_weights(self) -> ActivationQuantConfig:
        if self.activations == "int8-dynamic" and (self.bits != 8 or self.group_size != -1 or not self.symmetric):
            raise ValueError("int8-dynamic activations (W8A8-int8) need 8-bit symmetric per-channel weights "
                             "(bits 8, group_size -1, symmetric)")
        return self

    @property
    def scheme(self) -> QuantScheme:
        if self.activations == "int8-dynamic":
            return QuantScheme.w8a8_int8()
        return super().scheme

    @property
    def storage_format(self) -> str:
        """The codec the layers are written in: ``int-quantized`` for W8A8-int8, else ``pack-quantized``."""
        return "int-quantized" if self.activations == "int8-dynamic" else "pack-quantized"


class SchemeQuantizer:
    """What every pass whose config is a ``WeightQuantConfig`` says the same way (RTN, GPTQ, HQQ, AutoRound):
    a layer is checked against the scheme it will get, the layers come out quantized, the tag is the scheme's.
    Mixed in before the pass kind (``class RTNPass(SchemeQuantizer, LayerPass)``)."""

    config: WeightQuantConfig

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        self.config.scheme_for(linear.in_features).check_layer(name, linear.in_features)

    def quantizes(self) -> bool:
        return True

    def describe(self) -> str:
        return self.config.scheme.tag
