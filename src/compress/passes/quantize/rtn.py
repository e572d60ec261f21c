"""Round-to-nearest weight quantization: min/max scales per group, or a clipping search.

The baseline every other method must beat, and the fastest way to a packed checkpoint. It reads no data,
except with ``observer: imatrix`` (llama.cpp's importance matrix): the clipping search then weighs each
input column's squared error by that channel's mean squared calibration activation, so the scales are
fitted where the inputs have energy, at the cost of one calibration pass (a vector per layer, no Hessian).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from compress.calibrate.stats import InputAbsMaxStats, InputNormStats
from compress.codecs import quantize_linear
from compress.core.errors import CompressError
from compress.core.observers import choose_qparams
from compress.kernels.quant_linear import QuantLinear
from compress.passes.base import PASSES, LayerPass
from compress.passes.quantize._config import ActivationQuantConfig, SchemeQuantizer


class RTNConfig(ActivationQuantConfig):
    method: Literal["rtn"] = "rtn"
    observer: Literal["minmax", "mse", "imatrix"] = "minmax"
    """``minmax`` (no data), ``mse`` (clipping search on the plain weight error, no data) or ``imatrix``
    (the same search weighted by each input channel's mean squared calibration activation)."""


@PASSES.register("rtn")
class RTNPass(SchemeQuantizer, LayerPass):
    """Quantize each weight with min/max group scales, independently of any data."""

    config_cls = RTNConfig
    needs_calibration = False
    config: RTNConfig

    def __init__(self, config: RTNConfig) -> None:
        super().__init__(config)
        # only the weighted search and static FP8 input scales read data
        self.needs_calibration = config.observer == "imatrix" or config.activations == "fp8-static"

    def make_stats(self, name: str, linear: nn.Linear) -> InputNormStats | InputAbsMaxStats | None:
        if self.config.activations == "fp8-static":
            return InputAbsMaxStats(linear.in_features)
        return InputNormStats(linear.in_features) if self.config.observer == "imatrix" else None

    def record_facts(self, name: str, module: nn.Module) -> dict[str, Any]:
        """``imatrix`` is written as compressed-tensors' ``mse``: a clipping search chose the scales."""
        facts = super().record_facts(name, module)
        if facts.get("observer") == "imatrix":
            facts["observer"] = "mse"
        return facts

    def _importance(self, name: str, stats: Any | None):
        if self.config.observer != "imatrix":
            return None
        if not isinstance(stats, InputNormStats) or stats.tokens == 0:
            raise CompressError(f"the imatrix observer needs calibration inputs for layer {name}, and saw none")
        return stats.sq_norms / stats.tokens

    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        scheme = self.config.scheme_for(linear.in_features)
        importance = self._importance(name, stats)
        qparams = {}
        if self.config.observer != "minmax":
            qparams = dict(zip(("scale", "zero_point"),
                               choose_qparams(linear.weight.detach(), scheme.weight_only, observer="mse",
                                              importance=importance), strict=True))
        if scheme.has_static_inputs:  # W8A8-FP8 static: one input scale from the calibration's largest |x|
            if not isinstance(stats, InputAbsMaxStats) or stats.tokens == 0:
                raise CompressError(f"static FP8 input scales need calibration inputs for layer {name}, and saw none")
            qparams["input_absmax"] = stats.abs_max.max()
        if scheme.input_activations is not None or self.config.type == "float":
            # W8A8-int8 (int8 codes), W4A8 (packed), FP8 weights (e4m3 codes): the config's layout, inputs
            # quantized at run time
            return quantize_linear(linear, scheme, format=self.config.storage_format, **qparams)
        quantized = QuantLinear.from_linear(linear, scheme, **qparams)
        # zero lies in every group's range, so an earlier stage's pruned weights stay exactly zero: the layer's
        # record keeps its sparsity pattern (the observer is the default ``record_facts``)
        return self.with_runtime(quantized)
