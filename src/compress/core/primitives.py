"""Pure tensor math for integer weight quantization: qparams, quantize, dequantize.

Numerics follow the installed compressed-tensors package (``quantization/utils/helpers.py``
``calculate_qparams`` and ``lifecycle/forward_helpers.py``) so that codes we compute are the codes its
compressor would compute from the same scale, and a reader dequantizes to what we evaluated:

- min/max are widened to include 0;
- symmetric: ``scale = absmax / ((qmax - qmin) / 2)`` = ``absmax / ((2^b - 1) / 2)`` (int4: /7.5).
  FORMATS.md (and the brief) write ``absmax / (2^b / 2)``; the package divides by ``bit_max - bit_min``
  = 2^b - 1, and that is what we follow. It also keeps every element within half a step
  (absmax lands on qmax + 0.5), whereas /2^(b-1) would clip the positive extreme by a full step;
- asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zp = round(clamp(qmin - min / scale, qmin, qmax))``;
- a zero scale becomes float32 eps (the package uses the eps of the scale dtype);
- ``q = round(clamp(w / scale + zp, qmin, qmax))`` (clamp, then round half to even);
  ``w_hat = (q - zp) * scale``.

Everything is computed in float32 whatever the input dtype. Weights are ``[out, in]``; the group of
input column ``i`` is ``i // group_size``, or ``g_idx[i]`` when given (activation ordering).
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme

_EPS = torch.finfo(torch.float32).eps


def group_index(in_features: int, scheme: QuantScheme, g_idx: Tensor | None = None, device=None) -> Tensor:
    """The group id (int64 ``[in]``) of every input column."""
    if g_idx is not None:
        if g_idx.shape != (in_features,):
            raise CompressError(f"g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},)")
        return g_idx.to(device=device, dtype=torch.long)
    gs = scheme.effective_group_size(in_features)
    return torch.arange(in_features, device=device) // gs


def _check_weight(w: Tensor) -> None:
    if w.ndim != 2:
        raise CompressError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")


def _group_minmax(w: Tensor, scheme: QuantScheme, g_idx: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-(row, group) min and max of a float32 weight; reshape fast path, scatter otherwise."""
    out_f, in_f = w.shape
    n_groups = scheme.n_groups(in_f)
    gs = scheme.effective_group_size(in_f)
    if g_idx is None and in_f % gs == 0:
        grouped = w.reshape(out_f, n_groups, gs)
        return grouped.amin(dim=-1), grouped.amax(dim=-1)
    idx = group_index(in_f, scheme, g_idx, w.device).expand(out_f, in_f)
    if int(idx.max()) >= n_groups or int(idx.min()) < 0:
        raise CompressError(f"g_idx holds group ids outside 0..{n_groups - 1}")
    init_min = torch.full((out_f, n_groups), float("inf"), device=w.device)
    init_max = torch.full((out_f, n_groups), float("-inf"), device=w.device)
    mins = init_min.scatter_reduce(1, idx, w, reduce="amin")
    maxs = init_max.scatter_reduce(1, idx, w, reduce="amax")
    # an empty group (possible with g_idx) gets a zero range, hence the eps scale below
    return mins.nan_to_num(0.0, posinf=0.0, neginf=0.0), maxs.nan_to_num(0.0, posinf=0.0, neginf=0.0)


def compute_qparams(
    w: Tensor, scheme: QuantScheme, *, clip_ratio: float | Tensor = 1.0, g_idx: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Min-max scale (float32 ``[out, n_groups]``) and zero point (int32, zeros when symmetric).

    ``clip_ratio`` shrinks the observed range (scalar, or a tensor broadcastable to ``[out, n_groups]``)
    so clipping searches (AWQ, MSE observers) reuse this exact arithmetic.
    """
    scheme.validate()
    _check_weight(w)
    mins, maxs = _group_minmax(w.detach().float(), scheme, g_idx)
    if isinstance(clip_ratio, Tensor) or clip_ratio != 1.0:
        ratio = torch.as_tensor(clip_ratio, dtype=torch.float32, device=w.device)
        mins, maxs = mins * ratio, maxs * ratio
    return qparams_from_range(mins, maxs, scheme)


def group_minmax(w: Tensor, scheme: QuantScheme, g_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-(row, group) min and max of ``w`` ``[out, in]`` in float32, each ``[out, n_groups]``."""
    _check_weight(w)
    return _group_minmax(w.detach().float(), scheme, g_idx)


def qparams_from_range(mins: Tensor, maxs: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """Scale and zero point from an observed (possibly clipped) range of any shape: the one formula, so a
    search over many candidate ranges at once computes exactly what ``compute_qparams`` stores."""
    mins = torch.clamp(mins, max=0.0)
    maxs = torch.clamp(maxs, min=0.0)
    span = float(scheme.qmax - scheme.qmin)
    if scheme.symmetric:
        scale = torch.maximum(mins.abs(), maxs.abs()) / (span / 2)
        scale = torch.where(scale == 0, torch.full_like(scale, _EPS), scale)
        return scale, torch.zeros(scale.shape, dtype=torch.int32, device=mins.device)
    scale = (maxs - mins) / span
    scale = torch.where(scale == 0, torch.full_like(scale, _EPS), scale)
    zp = torch.clamp(scheme.qmin - mins / scale, scheme.qmin, scheme.qmax).round()
    return scale, zp.to(torch.int32)


def _expand(t: Tensor, idx: Tensor) -> Tensor:
    """Per-group ``[out, n_groups]`` values spread to per-column ``[out, in]``."""
    return t.index_select(1, idx)


def quantize(
    w: Tensor, scale: Tensor, zero_point: Tensor | None, scheme: QuantScheme, g_idx: Tensor | None = None
) -> Tensor:
    """Signed integer codes (int8 ``[out, in]``) of ``w`` under the given qparams."""
    _check_weight(w)
    idx = group_index(w.shape[1], scheme, g_idx, w.device)
    scaled = w.float() / _expand(scale.float(), idx)
    if zero_point is not None and not scheme.symmetric:
        scaled = scaled + _expand(zero_point.float(), idx)
    return torch.clamp(scaled, scheme.qmin, scheme.qmax).round().to(torch.int8)


def dequantize(
    q: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    scheme: QuantScheme,
    g_idx: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(q - zp) * scale`` computed in float32 (exact for these small integers), then cast to ``dtype``."""
    _check_weight(q)
    idx = group_index(q.shape[1], scheme, g_idx, q.device)
    vals = q.float()
    if zero_point is not None and not scheme.symmetric:
        vals = vals - _expand(zero_point.float(), idx)
    return (vals * _expand(scale.float(), idx)).to(dtype)


def fake_quantize(w: Tensor, scheme: QuantScheme) -> Tensor:
    """Quantize then dequantize with min-max qparams; same dtype as ``w`` (for error measurement)."""
    scale, zp = compute_qparams(w, scheme)
    q = quantize(w, scale, zp, scheme)
    return dequantize(q, scale, zp, scheme, dtype=w.dtype)
