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

ACTIVATION_SCHEMES = ("none", "int8-dynamic", "fp8-dynamic", "fp8-static")


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

    activations: Literal["none", "int8-dynamic", "fp8-dynamic", "fp8-static"] = "none"
    """``fp8-dynamic`` / ``fp8-static``: W8A8-FP8 (needs ``type: float``), inputs per token at run time, or
    one per-tensor scale per layer from the calibration's largest ``|x|`` (then the pass reads data)."""
    type: Literal["int", "float"] = "int"
    """Weight codes: ``int`` (packed integers), or ``float``: FP8 e4m3 (bits 8, per channel, symmetric, min/max
    scales ``absmax / 448``), stored ``float-quantized``."""

    @model_validator(mode="after")
    def _w8a8_weights(self) -> ActivationQuantConfig:
        if self.type == "float":
            if self.bits != 8 or self.group_size != -1 or not self.symmetric:
                raise ValueError("float (FP8 e4m3) weights need bits 8, group_size -1 (per channel) and symmetric")
            if self.observer != "minmax":
                raise ValueError("float (FP8 e4m3) weights take min/max scales (observer minmax)")
            if self.activations == "int8-dynamic":
                raise ValueError("int8-dynamic activations need int weights; use fp8-dynamic with float weights")
        elif self.activations.startswith("fp8"):
            raise ValueError(f"{self.activations} activations (W8A8-FP8) need float weights (type float)")
        if self.activations == "int8-dynamic" and (self.bits != 8 or self.group_size != -1 or not self.symmetric):
            raise ValueError("int8-dynamic activations (W8A8-int8) need 8-bit symmetric per-channel weights "
                             "(bits 8, group_size -1, symmetric)")
        return self

    @property
    def scheme(self) -> QuantScheme:
        if self.activations == "int8-dynamic":
            return QuantScheme.w8a8_int8()
        if self.type == "float":
            return QuantScheme.fp8() if self.activations == "none" \
                else QuantScheme.w8a8_fp8(static=self.activations == "fp8-static")
        return super().scheme

    def scheme_for(self, in_features: int) -> QuantScheme:
        return self.scheme if self.type == "float" else super().scheme_for(in_features)

    @property
    def storage_format(self) -> str:
        """The codec the layers are written in: ``int-quantized`` for W8A8-int8, else ``pack-quantized``."""
        if self.type == "float":
            return "float-quantized"
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
