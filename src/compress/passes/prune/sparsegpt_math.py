"""The SparseGPT column sweep (Frantar & Alistarh, 2023) as one pure function on tensors.

Same skeleton as GPTQ (the shared ``_obs`` machinery: dead inputs, damped inverse-Hessian Cholesky
factor ``U``, lazy block updates): columns are visited left to right; at column ``i`` the pruned entries
are set to zero (and, with joint quantization, kept entries are rounded to the grid), and the error
``(w - q) / U_ii`` is spread over the columns not yet visited, so ``‖(W - Ŵ)X‖`` stays minimal.

What differs from GPTQ is the mask selection, made with the OBS saliency ``w² / U_ii²`` of the weights
*as updated so far*:

- unstructured: at the start of each block of ``block_size`` columns, each row drops its lowest-saliency
  entries of that block. Row budgets are spread over blocks as ``round(s·i2) - round(s·i1)``, so every row
  ends with exactly ``round(s · in)`` zeros (per-row sparsity, as Wanda and our other pruners give);
- ``N:M``: at the start of each run of ``M`` columns, each row keeps its ``N`` highest-saliency entries.

Joint quantization: group scales are computed when a group's first column is reached (as GPTQ without
act-order), from the current values with already-pruned entries zeroed; pruned weights quantize to
exactly zero because zero is always inside the grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.observers import choose_qparams
from compress.core.scheme import QuantScheme
from compress.core.sparsity import NMPattern, pruned_per_row
from compress.passes._obs import (
    fake_quant_column,
    group_columns_now,
    inverse_hessian_factor,
    prepare_hessian,
    storable_scale,
)


@dataclass
class SparseGPTResult:
    weight: Tensor
    """float32 ``[out, in]``: the pruned (and, when quantized, dequantized) weight."""
    keep: Tensor
    """bool ``[out, in]``: the weights that survived."""
    loss: float
    """``½ Σ (w - q)² / U_ii²``: the OBS estimate of the added output error."""
    damp_used: float
    scale: Tensor | None = None
    """With joint quantization: float32 ``[out, n_groups]``, already representable in ``scale_dtype``;
    ``weight`` then lies exactly on the grid, so packing it with these qparams reproduces the sweep's codes."""
    zero_point: Tensor | None = None


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    *,
    sparsity: float = 0.5,
    pattern: NMPattern | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    scheme: QuantScheme | None = None,
    scale_dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] | None = None,
) -> SparseGPTResult:
    """Prune ``weight`` ``[out, in]`` against the Hessian of its inputs; quantize jointly when ``scheme``."""
    if block_size <= 0:
        raise CompressError(f"block size must be positive, got {block_size}")
    if pattern is not None and block_size % pattern.m:
        block_size = max(pattern.m, block_size - block_size % pattern.m)
    h, w, _dead = prepare_hessian(hessian, weight)
    out_f, in_f = w.shape
    if pattern is not None:
        pattern.check_layer("weight", in_f)
    total_pruned = 0 if pattern is not None else pruned_per_row(in_f, sparsity)
    if scheme is not None:
        scheme.validate()
        gs = scheme.effective_group_size(in_f)
        scale = torch.zeros(out_f, scheme.n_groups(in_f), dtype=torch.float32, device=w.device)
        zp = torch.zeros_like(scale, dtype=torch.int32)
        if scheme.per_channel:  # one group: its scale comes from the whole (not yet pruned) row
            s, z = choose_qparams(w, scheme)
            scale, zp = storable_scale(s, scale_dtype), z

    u, damp_used = inverse_hessian_factor(h, damp, log=log)
    keep = torch.ones_like(w, dtype=torch.bool)
    out = torch.zeros_like(w)
    losses = torch.zeros(out_f, dtype=torch.float32, device=w.device)

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        keep1 = keep[:, i1:i2]
        if pattern is None:
            k = round(sparsity * i2) - round(sparsity * i1) if total_pruned else 0
            if k:
                saliency = w1.square() / d1.square().unsqueeze(0)
                keep1.scatter_(1, torch.topk(saliency, k, dim=1, largest=False).indices, False)
        for i in range(i2 - i1):
            col = i1 + i
            if pattern is not None and i % pattern.m == 0:
                run = w1[:, i : i + pattern.m].square() / d1[i : i + pattern.m].square().unsqueeze(0)
                run_keep = torch.zeros_like(run, dtype=torch.bool)
                run_keep.scatter_(1, torch.topk(run, pattern.n, dim=1).indices, True)
                keep1[:, i : i + pattern.m] = run_keep
            wc = w1[:, i]
            qc = torch.where(keep1[:, i], wc, torch.zeros_like(wc))
            if scheme is not None:
                if not scheme.per_channel and col % gs == 0:
                    end = min(col + gs, in_f)
                    current = group_columns_now(w, w1, err1, u, i1, i2, col, end)
                    current[:, : min(end, i2) - col] *= keep1[:, i : min(end, i2) - i1]  # pruned so far: 0
                    s, z = choose_qparams(current, scheme)
                    g = col // gs
                    scale[:, g], zp[:, g] = storable_scale(s[:, 0], scale_dtype), z[:, 0]
                g = col // gs
                qc = torch.where(keep1[:, i], fake_quant_column(qc, scale[:, g], zp[:, g], scheme), qc)
            d = u1[i, i]
            out[:, col] = qc
            losses += (wc - qc).square() / d.square()
            e = (wc - qc) / d
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    result = SparseGPTResult(weight=out, keep=keep, loss=float(losses.sum()) / 2, damp_used=damp_used)
    if scheme is not None:
        result.scale, result.zero_point = scale, zp
    return result
