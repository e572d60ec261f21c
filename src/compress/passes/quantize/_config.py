"""Config fields shared by every weight-only integer quantizer (RTN, GPTQ, ...), and the activation scheme
the quantizers that solve only the weight side can add (``ActivationQuantConfig``: W8A8-int8, W4A8, W8A8-FP8).

Its own module because a pass module never imports another pass module (DESIGN: layer rules).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from compress.core.qargs import QuantArgs
from compress.core.scheme import QuantScheme
from compress.kernels.quant_linear import QuantLinear
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

    ``activations: int8-dynamic`` quantizes the inputs to int8 per token when the layer runs, so nothing about
    them is calibrated; the weights are solved as usual, symmetric, either at 8 bits per output channel
    (W8A8-int8, compressed-tensors' ``W8A8`` preset, stored ``int-quantized``) or at 4 bits in groups or per
    channel (W4A8, its ``W4A8`` preset, stored ``pack-quantized`` like W4A16). Other widths with int8 inputs
    are refused: no preset or reader we test describes them."""

    activations: Literal["none", "int8-dynamic", "fp8-dynamic", "fp8-static", "llm-int8"] = "none"
    """``fp8-dynamic`` / ``fp8-static``: W8A8-FP8 (needs ``type: float``), inputs per token at run time, or
    one per-tensor scale per layer from the calibration's largest ``|x|`` (then the pass reads data)."""
    threshold: float = Field(6.0, gt=0, allow_inf_nan=False)
    """``llm-int8`` (LLM.int8()): input dimensions with ``|x| >= threshold`` in a call stay in float, the rest
    run vector-wise int8 (``kernels/llm_int8.py``); the weights are ordinary W8A16 (8-bit per channel)."""
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
        if self.activations == "llm-int8" and (self.type != "int" or self.bits != 8 or self.group_size != -1
                                               or not self.symmetric):
            raise ValueError("llm-int8 runs on 8-bit symmetric per-channel int weights (bits 8, group_size -1, "
                             "symmetric)")
        if self.activations == "int8-dynamic" and not self._int8_weights_fit():
            raise ValueError("int8-dynamic activations need symmetric weights, either 8-bit per channel (W8A8-int8: "
                             "bits 8, group_size -1) or 4-bit (W4A8: bits 4, any group size)")
        return self

    def _int8_weights_fit(self) -> bool:
        """The weights of the two int8-input presets: W8A8-int8 (8-bit per channel) or W4A8 (4-bit)."""
        return self.symmetric and (self.bits == 4 or (self.bits == 8 and self.group_size == -1))

    @property
    def llm_int8_threshold(self) -> float | None:
        """The LLM.int8() outlier threshold its layers run with, None unless ``activations: llm-int8``."""
        return self.threshold if self.activations == "llm-int8" else None

    @property
    def _inputs(self) -> QuantArgs | None:
        """The int schemes' input args (FP8 inputs come with their own weights in ``scheme``)."""
        return QuantArgs.int8_per_token() if self.activations == "int8-dynamic" else None

    @property
    def scheme(self) -> QuantScheme:
        if self.type == "float":
            return QuantScheme.fp8() if self.activations == "none" \
                else QuantScheme.w8a8_fp8(static=self.activations == "fp8-static")
        return QuantScheme(weights=super().scheme.weights, input_activations=self._inputs)

    def scheme_for(self, in_features: int) -> QuantScheme:
        """As the weight-only scheme (a per-channel fallback included), with the same input quantization."""
        if self.type == "float":
            return self.scheme
        return QuantScheme(weights=super().scheme_for(in_features).weights, input_activations=self._inputs)

    @property
    def storage_format(self) -> str:
        """The codec the layers are written in: ``int-quantized`` for W8A8-int8 (int8 codes one per byte, the
        ``W8A8`` preset's layout), ``float-quantized`` for FP8, else ``pack-quantized`` (W4A16, W4A8, ...)."""
        if self.type == "float":
            return "float-quantized"
        return "int-quantized" if self.activations == "int8-dynamic" and self.bits == 8 else "pack-quantized"


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

    def with_runtime(self, module: nn.Module) -> nn.Module:
        """``module`` set to run what the config asks at run time beyond its codes (LLM.int8()'s outlier
        decomposition), so the blocks after it calibrate on what the export computes."""
        threshold = getattr(self.config, "llm_int8_threshold", None)
        if threshold is not None and isinstance(module, QuantLinear):
            module.outlier_threshold = threshold
        return module
