"""GPTQ: calibrated weight quantization, one layer at a time (the plumbing; the math is in gptq_math).

The pipeline feeds each targeted layer's inputs into a ``HessianStats`` (``make_stats``), then calls
``apply``, which runs the column sweep and packs its codes into a ``QuantLinear``. The codes are packed
as the sweep produced them, never re-derived from a dense weight, so what we ship is what was solved.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.calibrate.stats import HessianStats
from compress.core.errors import CompressError
from compress.core.packing import PackedWeight, scale_dtype_for
from compress.core.records import LayerRecord
from compress.core.scheme import QuantScheme
from compress.core.unpacked import UnpackedWeight
from compress.kernels.quant_linear import QuantLinear
from compress.passes.base import PASSES, LayerPass
from compress.passes.quantize._config import ActivationQuantConfig, SchemeQuantizer
from compress.passes.quantize.gptq_math import GPTQResult, gptq_quantize, output_error

logger = logging.getLogger("compress")

MIN_TOKENS_PER_INPUT = 4
"""Below ``4 × in_features`` calibration tokens the Hessian is (nearly) rank-deficient and damping, not
data, decides the solution: we warn. The reference setup (128 × 2048 tokens) gives 64× for a 4096-wide layer."""



AUTO_CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("minmax", {}),
    ("mse", {"max_shrink": 0.2, "grid": 20}),
    ("mse", {"max_shrink": 0.8, "grid": 80}),
)
"""The solves ``observer: auto`` compares per layer: no clipping, shallow clipping (the range llm-compressor's
MSE observer searches) and our full search. The step is 0.01 of the range in both searches."""

STORED_OBSERVER = {"minmax": "minmax", "mse": "mse", "imatrix": "mse"}
"""The observer each setting runs as (and names in the export's ``observer`` field, compressed-tensors'
vocabulary): ``imatrix`` is the Hessian-weighted search ``mse`` already is."""


class GPTQConfig(ActivationQuantConfig):
    """GPTQ options; ``bits``, ``group_size``, ``symmetric`` and ``observer`` come from the base."""

    method: Literal["gptq"] = "gptq"
    observer: Literal["minmax", "mse", "auto", "imatrix"] = "auto"
    """How group scales are chosen inside the sweep:

    - ``minmax``: the full range (llm-compressor's default);
    - ``mse``: the clipping search (81 ratios down to 0.2 of the range) minimising the group's squared error
      weighted by the Hessian diagonal, i.e. by each input channel's mean squared activation. That weighting
      is llama.cpp's importance matrix, so ``imatrix`` is accepted as the same search;
    - ``auto``: per layer, the whole sweep run with min/max, the search limited to shrinks <= 0.2 and the full
      search, keeping the solve with the lowest output error ``tr((W-Ŵ) H (W-Ŵ)ᵀ)``. A per-group weight
      error does not see GPTQ's error feedback, and at 2 bits the deep search over-clips: on qwen2-256 at
      W2g128 ``auto`` cut the KL by 17% (benchmarks/results/low_bits_depths.md). Three solves per layer.

    ``auto`` with act-order is the default: on both reference models it is never worse than ``mse`` without
    act-order and 0.71-0.87x its KL on qwen2-256 (W2g64 to W4g128; act-order alone was 1.17x at W2g64),
    0.95-1.00x on the demo model (benchmarks/results/beyond_gptq.md), for about 25% more solve time."""
    damp: float = Field(0.01, gt=0, lt=1)
    """Relative dampening: ``λ = damp · mean(diag H)`` added to the diagonal before inverting."""
    block_size: int = Field(128, gt=0)
    """Columns updated eagerly together; the rest of the matrix is updated once per block."""
    act_order: bool = True
    """Process columns by descending Hessian diagonal (the default since issue 12: with ``observer: auto`` it
    measured 0.71-0.87x the KL of natural order + mse on qwen2-256, benchmarks/results/beyond_gptq.md). Groups stay the original contiguous ones (scales
    computed up front, compressed-tensors ``actorder: weight``, no ``g_idx``), the only activation
    ordering today's readers load: compressed-tensors >= 0.19, vLLM and GPTQModel refuse the dynamic
    form (``actorder: group`` / ``desc_act``), so it is not offered."""
    static_groups: bool = False
    """Compute every group's scale before the sweep, in original contiguous groups (no ``g_idx`` needed).
    Always on with ``act_order``. Per-channel scales (``group_size: -1``) are always computed up front,
    so the flag changes nothing there."""

    @model_validator(mode="before")
    @classmethod
    def _act_order_keeps_groups_contiguous(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("act_order", cls.model_fields["act_order"].default):
            return data
        if data.get("static_groups") is False:
            raise ValueError("act_order with dynamic groups (static_groups: false, written as actorder: group / "
                             "desc_act) is refused by compressed-tensors >= 0.19, vLLM and GPTQModel; "
                             "leave static_groups unset or true")
        return {**data, "static_groups": True}

    @model_validator(mode="after")
    def _integer_grid(self) -> GPTQConfig:
        # refused while the recipe is read, before any weights load: GPTQ's error feedback is written for an
        # integer grid, and e4m3's round-to-nearest at 8 bits leaves it nothing to correct (FP8 uses rtn)
        if self.type == "float":
            raise ValueError("GPTQ solves integer grids only; FP8 weights (type float) use method rtn")
        return self


def pack_result(result: GPTQResult, config: GPTQConfig, dtype: torch.dtype,
                scheme: QuantScheme | None = None) -> PackedWeight:
    """The checkpoint tensors of a GPTQ result, packed from its codes (no re-quantization)."""
    return PackedWeight.from_codes(result.codes, result.scale.to(dtype), result.zero_point, scheme or config.scheme,
                                   result.g_idx)


@PASSES.register("gptq")
class GPTQPass(SchemeQuantizer, LayerPass):
    """Second-order weight quantization against each layer's calibration Hessian."""

    config_cls = GPTQConfig
    needs_calibration = True
    config: GPTQConfig

    def make_stats(self, name: str, linear: nn.Linear) -> HessianStats:
        # device=None: the Hessian lives wherever the pipeline runs the block (the first batch's device)
        return HessianStats(linear.in_features)

    def __init__(self, config: GPTQConfig) -> None:
        super().__init__(config)
        self._warned_widths: set[int] = set()
        self._chosen: dict[str, str] = {}
        """Layer name → the observer ``auto`` kept for it (what its record names)."""

    def apply_layer(self, name: str, linear: nn.Linear, stats: Any | None, prior: LayerRecord | None) -> nn.Module:
        """A layer an earlier stage pruned keeps its zeros (the OBS update would otherwise fill them)."""
        return self.apply(name, linear, stats, keep_zeros=prior is not None and prior.sparsity is not None)

    def record_facts(self, name: str, module: nn.Module) -> dict[str, Any]:
        """The observer, and ``actorder: weight`` when columns ran in activation order with contiguous groups
        (per-channel scales leave no trace of the order, as ``gptq_math`` reports)."""
        facts = super().record_facts(name, module)
        if facts:
            facts["observer"] = self._chosen.get(name, STORED_OBSERVER.get(self.config.observer, "mse"))
        if facts and self.config.act_order and not module.scheme.per_channel:
            facts["actorder"] = "weight"
        return facts

    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None, *, keep_zeros: bool = False) -> nn.Module:
        """``keep_zeros``: the layer's zero weights are pruned ones and stay zero."""
        if not isinstance(stats, HessianStats):
            raise CompressError(f"GPTQ needs calibration statistics for layer {name}, got none")
        if stats.tokens == 0:
            raise CompressError(f"calibration produced no tokens for layer {name}; GPTQ cannot run")
        self.check_layer(name, linear)
        k = linear.in_features
        if stats.tokens < MIN_TOKENS_PER_INPUT * k and k not in self._warned_widths:
            self._warned_widths.add(k)  # once per input width, not once per layer
            logger.warning(
                "calibration saw %d tokens for layer %s with %d inputs; the Hessian may be unstable "
                "(use at least %d tokens)",
                stats.tokens,
                name,
                k,
                MIN_TOKENS_PER_INPUT * k,
            )
        cfg = self.config
        scheme = cfg.scheme_for(k)
        dtype = scale_dtype_for(linear.weight.dtype)
        hessian = stats.hessian
        candidates = AUTO_CANDIDATES if cfg.observer == "auto" else ((STORED_OBSERVER[cfg.observer], {}),)
        best: tuple[float, str, GPTQResult] | None = None
        for observer, options in candidates:
            result = gptq_quantize(
                linear.weight.detach(),
                hessian,
                scheme.weight_only,  # only the weight side is solved; W8A8 inputs are quantized at run time
                block_size=cfg.block_size,
                damp=cfg.damp,
                act_order=cfg.act_order,
                static_groups=cfg.static_groups,
                observer=observer,
                observer_options=options,
                scale_dtype=dtype,
                keep_mask=linear.weight.detach() != 0 if keep_zeros else None,
                log=lambda msg: logger.warning("layer %s: %s", name, msg),
            )
            if len(candidates) == 1:
                best = (0.0, observer, result)
                break
            error = output_error(linear.weight, result.weight, hessian)
            if best is None or error < best[0]:  # ties keep the earlier, simpler candidate
                best = (error, observer, result)
        assert best is not None
        _, chosen, result = best
        self._chosen[name] = chosen
        logger.debug("layer %s: GPTQ loss %.6g (damp %g, %s)", name, result.loss, result.damp_used, chosen)
        bias = None if linear.bias is None else linear.bias.detach()
        if cfg.storage_format == "int-quantized":  # W8A8-int8: the solved codes as int8 (W4A8 packs them)
            storage = UnpackedWeight(result.codes.to(torch.int8).contiguous(), result.scale.to(dtype).contiguous(),
                                     None, None, scheme)
            return QuantLinear.from_storage(storage, bias, format=cfg.storage_format)
        return self.with_runtime(QuantLinear.from_packed(pack_result(result, cfg, dtype, scheme), bias))
