"""The GPTQ column sweep (Frantar et al., 2022) as one pure function on tensors.

Quantize the columns of ``W`` one at a time; after fixing column ``i``, spread its rounding error over
the columns not yet quantized so that ``‖(W - Ŵ) X‖²`` stays minimal (the Optimal Brain Surgeon update,
using the upper Cholesky factor ``U`` of ``H⁻¹`` from ``_obs``). Updates inside a block of
``block_size`` columns are applied eagerly; the rest of the matrix receives one matmul per block
("lazy batch" updates), which is what makes the sweep memory-bound rather than launch-bound.

Groups and act-order (compressed-tensors' ``actorder`` vocabulary):

- no act-order: groups are contiguous, ``group(i) = i // group_size``; ``g_idx`` is ``None``;
- act-order, dynamic groups (compressed-tensors ``"group"``): columns are processed by descending
  ``diag H`` and a group is ``group_size`` consecutive columns *of that order*, its scale computed
  when its first column is reached. ``g_idx[j] = position_of(j) // group_size`` for each ORIGINAL
  column ``j`` (llm-compressor's ``(arange // group_size)[invperm]``), always returned;
- act-order with static groups (compressed-tensors ``"weight"``): every group's scale is computed up
  front from the (dead-column-zeroed) weights in ORIGINAL contiguous groups, then columns are processed
  in act order. ``g_idx`` would be ``arange(in) // group_size``, so it is omitted (``None``): readers
  that default to the identity map need nothing, and ``result.actorder`` says which mode was used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.observers import OBSERVERS, choose_qparams
from compress.core.primitives import dequantize, quantize
from compress.core.scheme import QuantScheme
from compress.passes._obs import (
    act_order_permutation,
    group_columns_now,
    inverse_hessian_factor,
    prepare_hessian,
    storable_scale,
)


@dataclass
class GPTQResult:
    """What the sweep produced; ``codes``/``weight``/``g_idx`` are in ORIGINAL column order."""

    codes: Tensor
    """Signed int8 ``[out, in]``: exactly ``primitives.quantize(weight, scale, zero_point, scheme, g_idx)``."""
    scale: Tensor
    """float32 ``[out, n_groups]``, already representable in the storage dtype (``scale_dtype``)."""
    zero_point: Tensor
    """int32 ``[out, n_groups]`` (zeros when symmetric)."""
    g_idx: Tensor | None
    """int32 ``[in]`` group of each original column; only with act-order and dynamic groups."""
    weight: Tensor
    """float32 ``[out, in]``: the dequantized result, ``dequantize(codes, scale, zero_point, ...)``."""
    loss: float
    """``½ Σ (w - q)² / U_ii²`` over all columns: the OBS estimate of ``‖(W - Ŵ)X‖² / n``."""
    damp_used: float
    """The relative damping that made the Cholesky succeed (``damp`` unless retries raised it)."""
    actorder: str | None = None
    """compressed-tensors ``actorder`` of the result: ``"group"``, ``"weight"`` or ``None``."""


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    scheme: QuantScheme,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    observer: str = "minmax",
    observer_options: Mapping[str, Any] | None = None,
    scale_dtype: torch.dtype = torch.float32,
    keep_mask: Tensor | None = None,
    log: Callable[[str], None] | None = None,
) -> GPTQResult:
    """Quantize ``weight`` ``[out, in]`` against the Hessian ``[in, in]`` of its inputs (``2/n Σ x xᵀ``).

    ``scale_dtype`` is the dtype the scales will be stored in: each group's scale is rounded through it
    before any column uses it, so the codes are the ones a reader holding the stored scale reproduces.
    ``keep_mask`` (bool ``[out, in]``) preserves an earlier pruning: weights outside it are quantized
    to exactly zero (the zero point's code) and the OBS update moves their error onto kept weights, so a
    prune stage followed by GPTQ keeps its sparsity pattern. ``log`` receives a sentence whenever the
    damping had to be raised. ``observer_options`` go to ``choose_qparams`` with the observer (the clipping
    search's ``max_shrink`` and ``grid``).
    """
    scheme.validate()
    if block_size <= 0:
        raise CompressError(f"block size must be positive, got {block_size}")
    if observer not in OBSERVERS:
        raise CompressError(f"unknown observer {observer!r}; use {' or '.join(OBSERVERS)}")
    options = dict(observer_options or {})
    h, w, _dead = prepare_hessian(hessian, weight)
    out_f, in_f = w.shape
    gs = scheme.effective_group_size(in_f)
    n_groups = scheme.n_groups(in_f)
    importance = torch.diagonal(h).clone()

    keep = None
    if keep_mask is not None:
        if keep_mask.shape != w.shape:
            raise CompressError(f"keep mask of shape {tuple(keep_mask.shape)} does not match the weight {tuple(w.shape)}")
        keep = keep_mask.to(device=w.device, dtype=torch.bool)
        w = w * keep
    scale = torch.zeros(out_f, n_groups, dtype=torch.float32, device=w.device)
    zp = torch.zeros(out_f, n_groups, dtype=torch.int32, device=w.device)
    static = static_groups or scheme.per_channel  # one group: computing it first is the same thing
    if static:
        s, z = choose_qparams(w, scheme, observer=observer, importance=importance, **options)
        scale, zp = storable_scale(s, scale_dtype), z

    perm = invperm = None
    if act_order:
        perm, invperm = act_order_permutation(h)
        w, h, importance = w[:, perm], h[perm][:, perm], importance[perm]
        keep = None if keep is None else keep[:, perm]
    # group of each processed position: original contiguous groups when static, else order of processing
    if static and perm is not None:
        group_of = perm // gs
    else:
        group_of = torch.arange(in_f, device=w.device) // gs

    u, damp_used = inverse_hessian_factor(h, damp, log=log)
    q_all = torch.zeros_like(w)
    losses = torch.zeros(out_f, dtype=torch.float32, device=w.device)
    group_list = group_of.tolist()  # python ints: no device sync per column
    column = _ColumnQuantizer(scheme)
    if static:
        column.set_all(scale, zp)

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        q1 = q_all[:, i1:i2]
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % gs == 0:
                end = min(col + gs, in_f)
                current = group_columns_now(w, w1, err1, u, i1, i2, col, end)
                if keep is not None:
                    current = current * keep[:, col:end]
                s, z = choose_qparams(current, scheme, observer=observer, importance=importance[col:end],
                                      **options)
                g = group_list[col]
                scale[:, g], zp[:, g] = storable_scale(s[:, 0], scale_dtype), z[:, 0]
                column.set(g, scale[:, g], zp[:, g])
            wc = w1[:, i]
            qc = column(wc, group_list[col])
            if keep is not None:
                qc = qc.masked_fill_(~keep[:, col], 0.0)
            q1[:, i] = qc
            e = (wc - qc) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        losses += err1.square().sum(dim=1)  # (w - q)^2 / U_ii^2 summed over the block's columns
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    g_idx = None
    actorder = None
    if invperm is not None:
        q_all = q_all[:, invperm]
        if scheme.per_channel:
            actorder = None  # one scale per row: the processing order leaves no trace in the layout
        elif static:
            actorder = "weight"
        else:
            actorder = "group"
            g_idx = group_of[invperm].to(torch.int32)
    codes = quantize(q_all, scale, zp, scheme, g_idx)
    w_hat = dequantize(codes, scale, zp, scheme, g_idx)
    return GPTQResult(
        codes=codes,
        scale=scale,
        zero_point=zp,
        g_idx=g_idx,
        weight=w_hat,
        loss=float(losses.sum()) / 2,
        damp_used=damp_used,
        actorder=actorder,
    )


class _ColumnQuantizer:
    """``fake_quant_column`` for the sweep's inner loop: the same float32 operations in the same order
    (divide by the scale, add the zero point when asymmetric, clamp, round, subtract, multiply), so the
    result is bit-identical, but with each group's scale and zero point prepared once instead of the
    primitives' per-call checks and index tensors (the loop runs once per input column)."""

    def __init__(self, scheme: QuantScheme) -> None:
        self.qmin, self.qmax = float(scheme.qmin), float(scheme.qmax)
        self.symmetric = scheme.symmetric
        self._groups: dict[int, tuple[Tensor, Tensor]] = {}

    def set(self, group: int, scale: Tensor, zero_point: Tensor) -> None:
        self._groups[group] = (scale.float().clone(), zero_point.float().clone())

    def set_all(self, scale: Tensor, zero_point: Tensor) -> None:
        for group in range(scale.shape[1]):
            self.set(group, scale[:, group], zero_point[:, group])

    def __call__(self, w: Tensor, group: int) -> Tensor:
        s, z = self._groups[group]
        scaled = w.float() / s
        if not self.symmetric:
            scaled = scaled + z
        q = torch.clamp(scaled, self.qmin, self.qmax).round()
        if not self.symmetric:
            q = q - z
        return q * s


def output_error(weight: Tensor, dequantized: Tensor, hessian: Tensor) -> float:
    """``tr((W - Ŵ) H (W - Ŵ)ᵀ)``: the squared output error ``‖(W - Ŵ) X‖²`` (times ``2/n``) on the
    calibration inputs the Hessian summarises, the score that compares whole solves of one layer."""
    delta = weight.detach().float() - dequantized.float()
    return float(((delta @ hessian.float().to(delta.device)) * delta).sum())
