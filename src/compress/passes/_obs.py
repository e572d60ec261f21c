"""Shared Optimal-Brain-Surgeon machinery: the parts of a second-order column sweep that GPTQ and
SparseGPT have in common (the statistic is the same Hessian; only the per-column step differs).

- ``prepare_hessian``: a float32 working copy with dead inputs neutralised;
- ``inverse_hessian_factor``: the upper Cholesky factor of the damped inverse, retrying with more
  damping when the factorisation fails, and saying so;
- ``act_order_permutation``: the column order by descending Hessian diagonal;
- ``storable_scale`` / ``fake_quant_column``: the per-column quantization step both sweeps take when
  they quantize (GPTQ always, SparseGPT when asked for joint quantization).

Pure functions on tensors; no module, no model, no logging setup (a ``log`` callback reports).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.primitives import dequantize, quantize
from compress.core.scheme import QuantScheme

DEFAULT_RETRIES = 4
"""Damping grows 10× per retry: 0.01 → 0.1 → 1 → 10 → 100 × mean(diag H) before giving up."""


def prepare_hessian(hessian: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Working copies ``(H, W, dead)`` in float32 on the weight's device, with dead inputs handled.

    An input that was always zero in calibration (``H[j, j] == 0``) carries no information about the
    output: its row and column of ``H`` are zero, which makes ``H`` singular. Setting the diagonal entry
    to 1 keeps ``H`` invertible without coupling that input to any other, and zeroing the weight column
    is what the solver would converge to anyway (the column never contributes to the calibration output).
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise CompressError(f"expected a square Hessian, got shape {tuple(hessian.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hessian.shape[0]:
        raise CompressError(
            f"weight of shape {tuple(weight.shape)} does not match a Hessian of size {hessian.shape[0]}"
        )
    w = weight.detach().to(dtype=torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    if not bool(torch.isfinite(h).all()):
        raise CompressError("the calibration Hessian holds NaN or infinite values")
    dead = torch.diagonal(h) == 0
    if bool(dead.any()):
        idx = dead.nonzero().squeeze(1)
        h[idx, idx] = 1.0
        w[:, dead] = 0.0
    return h, w, dead


def inverse_hessian_factor(
    hessian: Tensor,
    damp: float,
    *,
    retries: int = DEFAULT_RETRIES,
    log: Callable[[str], None] | None = None,
) -> tuple[Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (so ``(H + λI)⁻¹ = Uᵀ U``), and the damp used.

    ``λ = damp · mean(diag H)``: relative damping keeps the same ``damp`` meaningful for layers whose
    inputs differ in scale by orders of magnitude. The factor of the *inverse* is what the sweep needs:
    row ``i`` of ``U`` restricted to columns ``≥ i`` gives the optimal update of the not-yet-processed
    columns after fixing column ``i``, and ``U[i, i]²`` its error denominator, without ever re-inverting.

    Either Cholesky can fail on a Hessian that is indefinite in floating point (few tokens, duplicated
    inputs, accumulated round-off); each failure multiplies ``damp`` by 10, up to ``retries`` times.
    """
    if not 0 < damp:
        raise CompressError(f"damping must be positive, got {damp}")
    n = hessian.shape[0]
    mean_diag = float(torch.diagonal(hessian).mean())
    if not mean_diag > 0:
        raise CompressError(f"the Hessian diagonal has non-positive mean {mean_diag}; cannot dampen it")
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    current = damp
    for attempt in range(retries + 1):
        damped = hessian + (current * mean_diag) * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, current
        if attempt == retries:
            break
        if log is not None:
            log(
                f"Cholesky of the damped Hessian failed with damp={current:g}; "
                f"retrying with damp={current * 10:g}"
            )
        current *= 10
    raise CompressError(
        f"the Hessian is not positive definite even with damp={current:g} after {retries} retries; "
        "calibrate on more (or more varied) tokens, or raise the damping"
    )


def act_order_permutation(hessian: Tensor) -> tuple[Tensor, Tensor]:
    """``(perm, invperm)``: columns by descending ``diag H`` (stable, so ties keep their order).

    Processing the inputs with the most activation energy first quantizes them while the most columns
    remain to absorb their error; ``invperm`` undoes the permutation (``x[:, perm][:, invperm] == x``).
    """
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    return perm, torch.argsort(perm)


def storable_scale(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Round a scale through its storage dtype (as ``pack_weight`` does) so codes use the stored value."""
    stored = scale.to(dtype)
    stored = torch.where(stored == 0, torch.full_like(stored, torch.finfo(dtype).tiny), stored)
    return stored.float()


def fake_quant_column(w: Tensor, scale: Tensor, zp: Tensor, scheme: QuantScheme) -> Tensor:
    """Quantize-dequantize one column ``[out]`` with the primitives' exact arithmetic."""
    col = w.unsqueeze(1)
    s, z = scale.unsqueeze(1), zp.unsqueeze(1)
    return dequantize(quantize(col, s, z, scheme), s, z, scheme).squeeze(1)


def group_columns_now(w: Tensor, w1: Tensor, err1: Tensor, u: Tensor, i1: int, i2: int, col: int,
                      end: int) -> Tensor:
    """Current values of columns ``col..end`` mid-sweep, for a group scale chosen when ``col`` is reached.

    ``w1`` holds the block ``i1..i2`` being swept (up to date); columns past the block have not yet had
    this block's pending lazy update (``err1 @ U``) applied, so it is applied here to the slice needed.
    """
    i = col - i1
    parts = [w1[:, i : min(end, i2) - i1]]
    if end > i2:
        parts.append(w[:, i2:end] - err1[:, :i] @ u[i1:col, i2:end])
    return torch.cat(parts, dim=1)
