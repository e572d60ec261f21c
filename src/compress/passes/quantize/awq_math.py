"""AWQ (Lin et al., 2023) as pure functions on tensors: the per-channel scale search and the clipping search.

A group of linears reads one input ``X`` ``[tokens, in]``. Scaling input channel ``j`` of every weight by
``s_j`` and the input by ``1/s_j`` computes the same outputs, but changes what rounding does: a salient
column (one that meets large activations) scaled up gets a relatively finer quantization step. AWQ searches
``s = mean|x|^α`` (normalised to a geometric mean of 1) over a grid of ``α ∈ [0, 1)``, scoring each
candidate by the squared output error ``Σ‖X Wᵀ − X (Q(W·s)/s)ᵀ‖²`` of every layer of the group on sampled
calibration rows; ``α = 0`` (no scaling, plain round-to-nearest) is always a candidate, and ties keep the
smaller ``α``, so the chosen scale never scores worse than RTN on those rows.

The clipping search then picks, per output row and group, the range shrink ratio whose quantized weights
best reproduce the group's partial output ``X_g w_gᵀ``: with ``H_g = X_gᵀ X_g`` (the block-diagonal part of
the Gram matrix of the rows), the error of a row's group is ``d H_g dᵀ`` for ``d = w_g − ŵ_g``, so all
candidates are scored without materialising outputs. Ratio 1.0 comes first and ties keep it.

Every candidate is quantized with the primitives' arithmetic (``core.primitives.qparams_from_range``, then
the same divide, clamp, round, multiply as ``quantize``/``dequantize``, bit for bit), which the export stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.observers import clip_ratios
from compress.core.primitives import group_minmax, qparams_from_range
from compress.core.scheme import QuantScheme

_MIN_SCALE = 1e-4
"""Floor of ``mean|x|^α`` before normalisation, so a channel that never fires does not get a zero scale."""


@dataclass(frozen=True)
class ScaleSearch:
    """The chosen per-channel scale and how the candidates scored."""

    scale: Tensor
    """float32 ``[in]``, positive: multiply weight columns by it (and divide the input)."""
    alpha: float
    losses: list[float]
    """Output squared error of each ``α`` on the grid, in grid order (``losses[0]`` is plain RTN)."""


def fake_quantize(w: Tensor, scheme: QuantScheme, clip_ratio: float | Tensor = 1.0) -> Tensor:
    """Quantize-dequantize ``w`` ``[out, in]`` in float32 with min/max qparams (range times ``clip_ratio``, a
    scalar or ``[out, n_groups]``): the primitives' operations in their order, on a grouped view."""
    w = w.detach().float()
    out_f, in_f = w.shape
    gs = scheme.effective_group_size(in_f)
    if in_f % gs:
        raise CompressError(f"group size {gs} does not divide {in_f} input columns")
    mins, maxs = group_minmax(w, scheme)
    if isinstance(clip_ratio, Tensor) or clip_ratio != 1.0:
        ratio = torch.as_tensor(clip_ratio, dtype=torch.float32, device=w.device)
        mins, maxs = mins * ratio, maxs * ratio
    scale, zero_point = qparams_from_range(mins, maxs, scheme)
    s = scale.unsqueeze(-1)
    scaled = w.reshape(out_f, in_f // gs, gs) / s
    if scheme.symmetric:
        w_hat = torch.clamp(scaled, scheme.qmin, scheme.qmax).round_() * s
    else:
        z = zero_point.float().unsqueeze(-1)
        w_hat = (torch.clamp(scaled + z, scheme.qmin, scheme.qmax).round_() - z) * s
    return w_hat.reshape(out_f, in_f)


def candidate_scale(mean_abs: Tensor, alpha: float) -> Tensor:
    """``mean|x|^α``, floored, divided by ``sqrt(max · min)`` so its geometric extremes straddle 1."""
    s = mean_abs.float().pow(alpha).clamp_min(_MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def output_error(delta: Tensor, x: Tensor, gram: Tensor | None) -> float:
    """``‖x δᵀ‖²``: through the Gram matrix ``xᵀx`` when given (``tr(δ G δᵀ)``, the same number for a
    fraction of the products when the rows outnumber the inputs), else from the rows."""
    if gram is not None:
        return float(((delta @ gram) * delta).sum())
    return float((x @ delta.t()).square().sum())


def search_scale(weights: list[Tensor], schemes: list[QuantScheme], x: Tensor, mean_abs: Tensor, *,
                 n_grid: int = 20) -> ScaleSearch:
    """The AWQ scale for the group of ``weights`` (each ``[out_i, in]``, quantized on ``schemes[i]``) that all
    read ``x`` (sampled rows ``[n, in]``), whose mean ``|x|`` per channel over all tokens is ``mean_abs``."""
    if n_grid < 1:
        raise CompressError(f"the AWQ grid needs at least 1 point, got {n_grid}")
    if x.ndim != 2 or x.shape[0] == 0:
        raise CompressError("the AWQ scale search needs calibration rows of the group's input, got none")
    n, in_f = x.shape
    if mean_abs.shape != (in_f,) or any(w.shape[1] != in_f for w in weights):
        raise CompressError("the AWQ scale search got inputs and weights of different widths")
    x = x.float()
    gram = x.t() @ x if in_f < n else None
    ws = [w.detach().float() for w in weights]
    losses: list[float] = []
    best: tuple[float, float, Tensor] | None = None
    for step in range(n_grid):
        alpha = step / n_grid
        s = candidate_scale(mean_abs.to(x.device), alpha)
        loss = sum(output_error(fake_quantize(w * s, scheme) / s - w, x, gram)
                   for w, scheme in zip(ws, schemes, strict=True))
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    assert best is not None
    return ScaleSearch(scale=best[2], alpha=best[1], losses=losses)


def group_gram(x: Tensor, scheme: QuantScheme) -> Tensor:
    """``X_gᵀ X_g`` for every group of input columns: float32 ``[n_groups, group, group]``."""
    n, in_f = x.shape
    gs = scheme.effective_group_size(in_f)
    if in_f % gs:
        raise CompressError(f"group size {gs} does not divide {in_f} input columns")
    xg = x.float().reshape(n, in_f // gs, gs).transpose(0, 1)  # [G, n, gs]
    return xg.transpose(1, 2) @ xg


def search_clip(w: Tensor, scheme: QuantScheme, gram: Tensor, *, grid: int = 20,
                max_shrink: float = 0.5) -> Tensor:
    """Per-(row, group) clip ratio ``[out, n_groups]`` minimising ``d H_g dᵀ`` (``gram`` from ``group_gram``
    on the rows the layer reads, already scaled as the layer will see them)."""
    w = w.detach().float()
    out_f, in_f = w.shape
    gs = scheme.effective_group_size(in_f)
    n_groups = in_f // gs
    if gram.shape != (n_groups, gs, gs):
        raise CompressError(f"a Gram matrix of shape {list(gram.shape)} does not fit {n_groups} groups of {gs}")
    best_err = best_ratio = None
    for ratio in clip_ratios(grid, max_shrink):
        d = (w - fake_quantize(w, scheme, ratio)).reshape(out_f, n_groups, gs)
        err = (torch.einsum("ogi,gij->ogj", d, gram) * d).sum(dim=-1)  # [out, G]
        if best_err is None or best_ratio is None:
            best_err, best_ratio = err, torch.full_like(err, ratio)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(err, ratio), best_ratio)
    assert best_ratio is not None
    return best_ratio
