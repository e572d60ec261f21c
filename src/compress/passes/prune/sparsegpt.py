"""SparseGPT: second-order pruning against each layer's calibration Hessian, optionally with joint
quantization (``bits``), in one pass over the model (the plumbing; the sweep is in ``sparsegpt_math``).

Output: the same ``nn.Linear`` with pruned weights zeroed, or, with ``bits``, a ``QuantLinear`` packed from
the sweep's own codes; either way the layer's record names the pattern (``RecordsSparsity``).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, field_validator
from torch import nn

from compress.calibrate.stats import HessianStats
from compress.core.errors import CompressError
from compress.core.packing import pack_weight, scale_dtype_for
from compress.core.scheme import QuantScheme
from compress.kernels.quant_linear import QuantLinear
from compress.passes.base import PASSES, LayerPass
from compress.passes.prune._config import PruneConfig, RecordsSparsity, apply_mask
from compress.passes.prune.sparsegpt_math import sparsegpt_prune

logger = logging.getLogger("compress")



class SparseGPTConfig(PruneConfig):
    method: Literal["sparsegpt"] = "sparsegpt"
    damp: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, gt=0)
    bits: Literal[2, 3, 4, 8] | None = None
    """Quantize the surviving weights in the same sweep (e.g. 2:4 + W4); ``None``: prune only."""
    group_size: int = 128
    symmetric: bool = True

    @field_validator("group_size")
    @classmethod
    def _group_size_valid(cls, value: int) -> int:
        if value != -1 and value <= 0:
            raise ValueError("group_size must be -1 (per channel) or a positive number of input columns")
        return value

    @property
    def scheme(self) -> QuantScheme | None:
        if self.bits is None:
            return None
        return QuantScheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)


@PASSES.register("sparsegpt")
class SparseGPTPass(RecordsSparsity, LayerPass):
    config_cls = SparseGPTConfig
    needs_calibration = True
    config: SparseGPTConfig

    def make_stats(self, name: str, linear: nn.Linear) -> HessianStats:
        return HessianStats(linear.in_features)

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        self.config.check_prunable(name, linear)
        if self.config.scheme is not None:
            self.config.scheme.check_layer(name, linear.in_features)

    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        if not isinstance(stats, HessianStats) or stats.tokens == 0:
            raise CompressError(f"SparseGPT needs calibration inputs for layer {name}, and saw none")
        cfg = self.config
        scheme = cfg.scheme
        dtype = scale_dtype_for(linear.weight.dtype)
        result = sparsegpt_prune(
            linear.weight.detach(), stats.hessian, sparsity=cfg.sparsity_for(name), pattern=cfg.nm,
            block_size=cfg.block_size, damp=cfg.damp, scheme=scheme, scale_dtype=dtype,
            log=lambda msg: logger.warning("layer %s: %s", name, msg),
        )  # fmt: skip
        if scheme is None:
            linear.weight.data.copy_(result.weight.to(linear.weight.dtype))
            return apply_mask(name, linear, result.keep, cfg)
        assert result.scale is not None and result.zero_point is not None
        packed = pack_weight(result.weight, scheme, scale=result.scale, zero_point=result.zero_point,
                             scale_dtype=dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        return QuantLinear.from_packed(packed, bias)

    def quantizes(self) -> bool:
        return self.config.bits is not None

    def describe(self) -> str:
        tag = f"sparsegpt-{self.config.tag()}"
        scheme = self.config.scheme
        return tag if scheme is None else f"{tag}-{scheme.tag}"
