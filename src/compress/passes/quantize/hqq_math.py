"""HQQ (Half-Quadratic Quantization, Badri & Shaji 2023): the zero point, and optionally the scale, of every
(row, group) chosen to minimise an lp-norm (``p <= 1``, 0.7 by default) of the weight error, without
calibration data.

The problem ``min_z ||W - (Q_z(W) - z)·s||_p^p`` is non-convex and non-smooth; half-quadratic splitting adds
an auxiliary error ``W_e`` and a penalty ``β/2·||W_e - (W - Ŵ)||²`` and alternates two easy steps:

1. ``W_e = shrink_p(W - Ŵ; β)``: the proximal step of the lp term, a generalized soft threshold: an element
   whose error is small relative to ``|x|^(p-1)/β`` becomes 0 (counted as "fitted"), a large one is kept
   (an outlier the grid gives up on);
2. ``z = mean(Q - (W - W_e)/s)`` over the group: the closed-form least-squares zero point for the current
   codes once the outlier errors are taken out (HQQ's own step); with ``optimize_scale`` the scale takes
   its least-squares value for those codes and that zero point too.

``β`` grows by ``κ`` each iteration so ``W_e`` tends to the real error and the iteration settles. Each
iterate is scored by a criterion (the squared error by default: the loop's lp steps propose, the error a
data-free output estimate cares about decides; HQQ's code tracks the mean absolute error); a group
whose error stops improving is frozen at its best iterate (HQQ stops the whole tensor at the first
non-improvement; groups are independent problems, so here each one stops on its own), and a chunk of rows
stops once an iteration lowers its total error by less than ``tol``. Rows are solved in chunks of about
1 MB so the ~20 elementwise passes of an iteration run from cache.

Two deliberate departures from the peers (the second because our checkpoints must stay readable by
compressed-tensors: integer zero points, codes from the stored scale):

- The shrink works in units of the group's quantization step (the error divided by the scale), so ``β``
  means the same thing for every layer and weight magnitude. In the peers' weight units, ``β = 10`` on
  weights of std 0.02 shrinks every error to 0 and the loop reduces to plain least squares on ``z``.
  Here ``β = 1`` at the start zeroes every error below one step (all rounding errors count as fitted,
  an outlier clipped by more than a step is given up on); as ``β`` grows the largest rounding errors
  are let go too.
- The zero point is an integer (``zero_point="round-refit"``: optimise in float, round ``z`` into
  ``[qmin, qmax]``, then refit the scale for the rounded zero point by a few least-squares steps;
  ``"integer"``: round ``z`` after every step, so the scale does the fine work). Every candidate is scored
  with its scale rounded through the storage dtype and the codes of ``primitives.quantize``, so the best
  iterate's error is the error a reader sees.

Symmetric schemes have no zero point: the same loop optimises only the scale (step 2 is the least-squares
scale with ``z = 0``).

Pure functions on float32 tensors. Contiguous groups only (HQQ has no activation ordering).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.primitives import compute_qparams
from compress.core.scheme import QuantScheme

ZeroPointMode = Literal["round-refit", "integer"]
Criterion = Literal["l2", "lp", "l1"]


@dataclass(frozen=True)
class HQQResult:
    scale: Tensor
    """float32 ``[out, n_groups]``, already exactly representable in the storage dtype."""
    zero_point: Tensor
    """int32 ``[out, n_groups]`` in ``[qmin, qmax]`` (zeros when symmetric)."""
    iterations: int
    """Iterations the loop ran before every group was frozen (or the limit)."""


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """Generalized soft threshold, the proximal step of ``|x|^p / β`` (one fixed-point step for ``p < 1``):
    ``sign(x)·max(|x| - |x|^(p-1)/β, 0)``; ``p = 1`` is the ordinary soft threshold at ``1/β``.

    Nonzero only where ``|x| > β^(-1/(2-p))``; in the loop that is a few elements (errors of more than about
    a step), so the power is taken there only: it costs several times any other elementwise pass."""
    kept = (x.abs() > beta ** (-1.0 / (2.0 - p))).reshape(-1).nonzero().squeeze(1)
    out = torch.zeros(x.shape, dtype=x.dtype, device=x.device)  # contiguous, so view(-1) below is in place
    if kept.numel():
        xk = x.reshape(-1).index_select(0, kept)
        out.view(-1).index_copy_(0, kept, xk * (1.0 - xk.abs().pow(p - 2.0) / beta))
    return out


def _stored(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The scale as the checkpoint stores it (as ``pack_weight`` rounds it), back in float32."""
    if dtype == torch.float32:
        return scale.where(scale != 0, torch.finfo(dtype).tiny)
    s = scale.to(dtype)
    return s.where(s != 0, torch.finfo(dtype).tiny).float()


_CHUNK_ELEMENTS = 1 << 18
"""Weights solved together (1 MB of float32): rows are independent problems, and a chunk that stays in cache
makes the ~20 elementwise passes per iteration several times faster than sweeping the whole matrix."""


def _evaluate(w: Tensor, scale: Tensor, zp: Tensor, scheme: QuantScheme, criterion: Criterion, p: float):
    """For grouped weights ``[rows, n_groups, group]``, a (stored) scale and a zero point: ``w/s``, the codes
    of ``primitives.quantize`` (clamp, then round half to even; as floats), the error ``u`` in steps, and the
    per-group error in weight units by which iterates are compared (``criterion``)."""
    x = w / scale.unsqueeze(-1)
    shifted = x if scheme.symmetric else x + zp.unsqueeze(-1)
    q = shifted.clamp(scheme.qmin, scheme.qmax).round_()
    u = shifted - q
    if criterion == "l2":
        err = (scale * scale) * (u * u).sum(-1)  # x*x, not square(): square dispatches to pow
    elif criterion == "l1":
        err = scale * u.abs().sum(-1)
    else:
        err = scale.pow(p) * u.abs().pow_(p).sum(-1)
    return x, q, u, err


def _rescaled(scale: Tensor, num: Tensor, den: Tensor, dtype: torch.dtype) -> Tensor:
    """``scale·num/den`` (the least-squares factor) rounded through the storage dtype; the old scale where
    that factor is unusable (every code on the zero point, or a non-positive fit)."""
    new = num.div_(den).mul_(scale)
    return _stored(new.where((new > 0) & (new < float("inf")), scale), dtype)  # nan fails both tests


def hqq_qparams(w: Tensor, scheme: QuantScheme, *, iterations: int = 20, p: float = 0.7, beta: float = 1.0,
                kappa: float = 1.05, optimize_scale: bool = True, zero_point: ZeroPointMode = "round-refit",
                refit_steps: int = 4, tol: float = 1e-4, criterion: Criterion = "l2",
                scale_dtype: torch.dtype = torch.float32) -> HQQResult:
    """HQQ scale and zero point for ``w`` ``[out, in]`` under ``scheme``, starting from min/max.

    Per (row, group), the candidates are min/max (the start, so the result is never worse than RTN by the
    criterion), every iterate of the half-quadratic loop and (``round-refit``) the refits after rounding;
    the one with the smallest error as stored (integer zero point, stored scale) is kept, the error being
    ``criterion``: ``l2`` (``Σ(w - ŵ)²``, what a layer's output error is for isotropic inputs), ``lp``
    (``Σ|w - ŵ|^p``, the loop's own objective) or ``l1`` (what the HQQ reference code tracks).
    """
    if w.ndim != 2:
        raise CompressError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not 0 < p <= 1:
        raise CompressError(f"HQQ's lp-norm needs 0 < p <= 1, got {p}")
    scheme.validate()
    w = w.detach().float()
    out_f, in_f = w.shape
    gs = scheme.effective_group_size(in_f)
    if in_f % gs:
        raise CompressError(f"HQQ needs contiguous groups that divide the input width ({in_f} % {gs})")
    init_s, init_z = compute_qparams(w, scheme)
    grouped = w.reshape(out_f, in_f // gs, gs)
    rows = max(1, _CHUNK_ELEMENTS // max(in_f, 1))
    scales, zeros, ran = [], [], 0
    for r0 in range(0, out_f, rows):
        s, z, n = _solve(grouped[r0:r0 + rows], _stored(init_s[r0:r0 + rows], scale_dtype),
                         init_z[r0:r0 + rows].float(), scheme, iterations=iterations, p=p, beta=beta,
                         kappa=kappa, optimize_scale=optimize_scale, zero_point=zero_point,
                         refit_steps=refit_steps, tol=tol, criterion=criterion,
                         scale_dtype=scale_dtype)
        scales.append(s)
        zeros.append(z)
        ran = max(ran, n)
    zp = torch.cat(zeros)
    zp = torch.zeros_like(zp) if scheme.symmetric else zp.round().clamp(scheme.qmin, scheme.qmax)
    return HQQResult(scale=torch.cat(scales), zero_point=zp.to(torch.int32), iterations=ran)


def _solve(w: Tensor, init_s: Tensor, init_z: Tensor, scheme: QuantScheme, *, iterations: int, p: float,
           beta: float, kappa: float, optimize_scale: bool, zero_point: ZeroPointMode, refit_steps: int,
           tol: float, criterion: Criterion, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor, int]:
    """The loop on one chunk of grouped rows ``[rows, n_groups, group]``: best scale, zero point, iterations."""
    sym, n = scheme.symmetric, w.shape[-1]
    scale, zp = init_s, init_z
    x, q, u, err = _evaluate(w, scale, zp, scheme, criterion, p)
    init_err = err
    best_s, best_z, best_err = scale, zp, err
    active = torch.ones_like(err, dtype=torch.bool)
    ran = 0
    for _ in range(iterations):
        ran += 1
        # W_e / s, the generalized soft threshold of the error in steps: u·max(1 - |u|^(p-2)/β, 0)
        e = shrink_lp(u, beta, p)  # W_e / s: the generalized soft threshold of the error in steps
        y = x.sub_(e)  # (W - W_e)/s; x is not needed again
        sum_q, sum_y = q.sum(-1), y.sum(-1)
        sum_yq = y.mul_(q).sum(-1)
        if sym:
            new_z = zp
            new_s = _rescaled(scale, sum_yq, (q * q).sum(-1), scale_dtype)
        else:
            new_z = (sum_q - sum_y) / n  # HQQ's step: mean(Q - (W - W_e)/s)
            if zero_point == "integer":
                new_z = new_z.round()
            new_z = new_z.clamp(scheme.qmin, scheme.qmax)
            new_s = scale
            if optimize_scale:  # least squares of (W - W_e)/s on (Q - z): Σ y(q - z) / Σ (q - z)²
                den = (q * q).sum(-1) - 2 * new_z * sum_q + n * new_z * new_z
                new_s = _rescaled(scale, sum_yq - new_z * sum_y, den, scale_dtype)
        scale, zp = torch.where(active, new_s, scale), torch.where(active, new_z, zp)
        prev = err
        x, q, u, err = _evaluate(w, scale, zp, scheme, criterion, p)  # float zero point in round-refit: the loop's objective
        better = active & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, scale, best_s), torch.where(better, zp, best_z)
        active = active & (err < prev)  # a group whose error stopped falling is frozen
        beta *= kappa
        before, after = prev.sum(), err.sum()
        if bool((before - after <= tol * before) | ~active.any()):  # HQQ's early stop, for the chunk
            break
    if not sym and zero_point == "round-refit":
        # the float optimum mapped to the integer grid: round z, then refit the scale for that zero point
        scale, zp = best_s, best_z.round().clamp(scheme.qmin, scheme.qmax)
        x, q, _, err = _evaluate(w, scale, zp, scheme, criterion, p)
        best_s, best_z, best_err = scale, zp, err
        z3 = zp.unsqueeze(-1)
        for _ in range(refit_steps):
            c = q.sub_(z3)
            scale = _rescaled(scale, (x * c).sum(-1), (c * c).sum(-1), scale_dtype)
            x, q, _, err = _evaluate(w, scale, zp, scheme, criterion, p)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, scale, best_s)
        keep = init_err <= best_err  # min/max stays a candidate: never worse than it once stored
        best_s, best_z = torch.where(keep, init_s, best_s), torch.where(keep, init_z, best_z)
    return best_s, best_z, ran
