"""HQQ: calibration-free weight quantization whose zero points and scales minimise an lp-norm of the weight
error by half-quadratic splitting (the plumbing; the math is in hqq_math).

Each targeted layer's weight goes through ``hqq_math.hqq_qparams`` (min/max start, the half-quadratic
loop per row and group, then the mapping to an integer zero point), and the layer is packed with those
qparams by ``QuantLinear.from_linear``: the codes are ``primitives.quantize`` of the weight with the scale
as stored, so what readers dequantize is exactly what was scored.

Integer zero points (compressed-tensors ``pack-quantized`` stores them so): HQQ's own answer is a float
zero point with the min/max scale. Rounded to the grid, it lands back on min/max's zero point for almost
every group (the loop moves it by less than half a step), so optimising the zero point alone buys nothing
once stored; refitting the scale is what pays. Variants on the embedded demo model (held-out KL,
W4g128 / W3g128): the default (``optimize_scale``, ``round-refit``, iterates compared by squared error)
0.0214 / 0.0850; ``zero_point: integer`` 0.0216 / 0.0861; zero point only (``optimize_scale: false``, the
scale refit after rounding still on) 0.0217 / 0.0921; ``criterion: lp`` 0.0218 / 0.0864, ``l1`` 0.0216 /
0.0870; min/max asymmetric RTN 0.0243 / 0.1106. A zero point optimised alone and rounded, with no refit,
is min/max exactly.

``symmetric: true`` has no zero point: the same loop optimises the scale alone (zero fixed at 0).
HQQ is asymmetric by nature, and so is this pass's default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from compress.core.packing import scale_dtype_for
from compress.kernels.quant_linear import QuantLinear
from compress.passes.base import PASSES, LayerPass
from compress.passes.quantize._config import SchemeQuantizer, WeightQuantConfig
from compress.passes.quantize.hqq_math import hqq_qparams

STORED_OBSERVER = "mse"
"""What ``quantization_config`` names as the observer: readers know no ``hqq`` observer, and ``mse`` (an
error-minimising choice of scales) is the registered name closest to what chose them."""


class HQQConfig(WeightQuantConfig):
    """HQQ options; ``bits``, ``group_size``, ``indivisible`` come from the base."""

    method: Literal["hqq"] = "hqq"
    symmetric: bool = False
    """Asymmetric (an integer zero point per group), as HQQ is. ``true``: zero fixed at 0, the loop
    optimises the scale alone."""
    observer: Literal["hqq"] = "hqq"
    """The scales come from the HQQ solve; no other observer applies (``mse`` is what the checkpoint says)."""
    iterations: int = Field(20, ge=1, le=1000)
    """Half-quadratic iterations at most (the paper's 20). Each is a few elementwise passes over the weight;
    a group stops as soon as its error no longer falls."""
    lp: float = Field(0.7, gt=0, le=1)
    """``p`` of the lp-norm minimised (the paper's 0.7): below 1 it tolerates a few large errors (outliers
    the grid gives up on) in exchange for fitting the bulk of the weights closely."""
    beta: float = Field(1.0, gt=0)
    """Initial weight of the quadratic coupling, in units of the group's quantization step (so one value
    fits every layer; the peers' 10 is in weight units, where it zeroes every error). Small: the shrink
    zeroes every error (a plain least-squares fit); 1: errors below one step count as fitted, outliers
    clipped by more than a step are given up on; large: only the smallest errors count as fitted."""
    kappa: float = Field(1.05, ge=1, le=2)
    """``beta`` grows by this factor per iteration, so the auxiliary error converges to the real one and
    the loop settles (the paper uses 1.01 to 1.05)."""
    tol: float = Field(1e-4, ge=0, lt=1)
    """Early stop: a chunk of rows stops iterating once an iteration lowers its total error by less than this
    fraction (HQQ stops at the first iteration that does not improve; the last iterations of 20 buy
    hundredths of a percent of the error and cost as much as the first)."""
    criterion: Literal["l2", "lp", "l1"] = "l2"
    """The error by which a group's iterates are compared, the best kept and the early stop decided: the
    loop minimises the lp-norm, but with data-free inputs the output error of a layer is (for isotropic
    inputs exactly) the squared weight error, so ``l2`` (default) keeps the iterate closest in that sense;
    ``lp`` keeps the lp-optimal one (it can raise the squared error above min/max's on heavy tails), ``l1``
    is what the HQQ reference code tracks."""
    optimize_scale: bool = True
    """Refit the scale by least squares in every iteration too (not only the zero point): with integer zero
    points this is where the gain comes from."""
    zero_point: Literal["round-refit", "integer"] = "round-refit"
    """``round-refit``: optimise with a float zero point, round it into ``[qmin, qmax]``, then refit the scale
    for the rounded zero point (``refit_steps``). ``integer``: round the zero point after every iteration."""
    refit_steps: int = Field(4, ge=0, le=100)
    """Least-squares scale refits after rounding the zero point (``round-refit`` only)."""


@PASSES.register("hqq")
class HQQPass(SchemeQuantizer, LayerPass):
    """Quantize each weight with HQQ-optimised group scales and integer zero points, independently of data."""

    config_cls = HQQConfig
    needs_calibration = False
    config: HQQConfig

    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        cfg = self.config
        scheme = cfg.scheme_for(linear.in_features)
        w = linear.weight.detach()
        result = hqq_qparams(w, scheme, iterations=cfg.iterations, p=cfg.lp, beta=cfg.beta, kappa=cfg.kappa,
                             optimize_scale=cfg.optimize_scale, zero_point=cfg.zero_point,
                             refit_steps=cfg.refit_steps, tol=cfg.tol,
                             criterion=cfg.criterion, scale_dtype=scale_dtype_for(w.dtype))
        # the scale is already exact in the storage dtype, so pack_weight's rounding leaves it unchanged and
        # its codes (primitives.quantize) are the ones the solve scored; zero lies in every group's grid range
        # only up to rounding, so a pruned weight may not stay exactly zero (as with any refitted scale)
        return QuantLinear.from_linear(linear, scheme, scale=result.scale, zero_point=result.zero_point)

    def record_facts(self, name: str, module: nn.Module) -> dict[str, Any]:
        return {"observer": STORED_OBSERVER} if isinstance(module, QuantLinear) else {}
