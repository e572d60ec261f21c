"""SmoothQuant (Xiao et al., 2023) as pure functions on tensors: the per-channel smoothing scale, the W8A8
error it is judged by, and the search over the migration strength ``α``.

A group of linears reads one input ``X`` ``[tokens, in]``. Per-token int8 quantization of ``X`` spends its
256 levels on each token's largest entry, so a few outlier channels (LLM activations have them, in fixed
channels) leave every other channel with a handful of levels. Dividing input channel ``j`` by ``s_j`` and
multiplying column ``j`` of every reader's weight by ``s_j`` computes the same outputs and moves that
difficulty into the weights, which int8 per-output-channel quantization absorbs far better::

    s_j = max_t |X_tj|^α / max_k |W_kj|^(1-α)      (max_k over the rows of EVERY reader of X)

``α = 0.5`` is the paper's default (both sides end with the same per-channel maximum ``sqrt(max|X|·max|W|)``);
``α → 1`` pushes everything into the weights.

Numerics: a channel whose calibration inputs are all zero, or whose weight columns are all zero in every
reader, gets ``s = 1`` (``0^α`` or ``x/0`` would make a zero or infinite scale and a fold that is no longer
exact); every scale is clamped to ``[1e-5, 1e5]`` (``SCALE_MIN``, ``SCALE_MAX``, SmoothQuant's own floor, mirrored
above), which bounds how far one fold can move the magnitude of a norm weight or a weight column (a near-dead
channel, ``max|X| ~ 1e-30``, would otherwise get a scale that underflows its float16/bfloat16 norm weight);
a non-finite value (an inf in the inputs) becomes 1. Real scales sit far inside that range (0.01 to 100).

The search (``search_alpha``) scores each candidate by what W8A8 loses on the sampled calibration rows:
``Σ_i ‖X Wᵢᵀ − Q_tok(X / s) Q_ch(Wᵢ · s)ᵀ‖²``, with ``Q_tok`` the per-token dynamic int8 quantization the
layers run (``kernels.int8_act``) and ``Q_ch`` the int8 symmetric per-channel min/max weight quantization
(``core.primitives``, bit for bit what RTN stores). The unsmoothed model (``s = 1``) is a candidate too,
first, and ties keep the earlier candidate, so the chosen scale never scores worse than not smoothing, nor
than any ``α`` on the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.primitives import fake_quantize
from compress.core.scheme import QuantScheme
from compress.kernels.int8_act import fake_quantize_input

SCALE_MIN = 1e-5
SCALE_MAX = 1e5
W8A8 = QuantScheme.w8a8_int8()


@dataclass(frozen=True)
class AlphaSearch:
    """The chosen scale and how every candidate scored."""

    scale: Tensor
    """float32 ``[in]``, positive: multiply weight columns by it, divide the input by it."""
    alpha: float | None
    """The chosen ``α``; None when not smoothing (``s = 1``) scored best."""
    losses: dict[float | None, float]
    """W8A8 output squared error per candidate (key None: no smoothing), in search order."""


def weight_abs_max(weights: list[Tensor]) -> Tensor:
    """``max_k |W_kj|`` over the rows of every weight (each ``[out_i, in]``): float32 ``[in]``."""
    if not weights or any(w.ndim != 2 or w.shape[1] != weights[0].shape[1] for w in weights):
        raise CompressError("SmoothQuant needs the 2-D weights of layers reading one input, of equal input width")
    return torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)


def smooth_scale(x_abs_max: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """``s = max|X|^α / max|W|^(1-α)`` per input channel, guarded and clamped (module docstring)."""
    if not 0.0 <= alpha <= 1.0:
        raise CompressError(f"SmoothQuant's alpha must lie in [0, 1], got {alpha}")
    w_max = weight_abs_max(weights).to(x_abs_max.device)
    x_max = x_abs_max.float()
    if x_max.shape != w_max.shape:
        raise CompressError(f"input statistics of width {x_max.shape[0]} do not fit weights of {w_max.shape[0]} columns")
    s = x_max.pow(alpha) / w_max.pow(1.0 - alpha)
    dead = (x_max == 0) | (w_max == 0) | ~torch.isfinite(s)
    s = torch.where(dead, torch.ones_like(s), s)
    return s.clamp(SCALE_MIN, SCALE_MAX)


def w8a8_error(weights: list[Tensor], x: Tensor, scale: Tensor | None = None) -> float:
    """``Σ_i ‖x Wᵢᵀ − Q_tok(x/s) Q_ch(Wᵢ·s)ᵀ‖²`` on rows ``x`` ``[n, in]`` (float32 math); ``scale`` None: s = 1."""
    x = x.float()
    xs = x if scale is None else x / scale
    xq = fake_quantize_input(xs, W8A8.input_activations)  # type: ignore[arg-type]
    total = 0.0
    for w in weights:
        wf = w.detach().float()
        ws = wf if scale is None else wf * scale
        total += float((x @ wf.t() - xq @ fake_quantize(ws, W8A8).t()).square().sum())
    return total


def alpha_grid(points: int) -> list[float]:
    """``0, 1/points, ..., 1`` (``points + 1`` values; an even ``points`` includes 0.5)."""
    if points < 1:
        raise CompressError(f"the alpha grid needs at least 1 step, got {points}")
    return [step / points for step in range(points + 1)]


def search_alpha(weights: list[Tensor], x: Tensor, x_abs_max: Tensor, *, points: int = 20) -> AlphaSearch:
    """The candidate (no smoothing, then each ``α`` of ``alpha_grid(points)``) whose W8A8 error on the sampled
    rows ``x`` is lowest; ``x_abs_max`` is the per-channel ``max|x|`` over every calibration token."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise CompressError("the SmoothQuant alpha search needs calibration rows of the group's input, got none")
    x = x.float()
    device = x.device
    ws = [w.detach().to(device) for w in weights]
    losses: dict[float | None, float] = {None: w8a8_error(ws, x)}
    best_alpha, best_loss = None, losses[None]
    best_scale = torch.ones(x.shape[1], dtype=torch.float32, device=device)
    for alpha in alpha_grid(points):
        s = smooth_scale(x_abs_max.to(device), ws, alpha)
        loss = w8a8_error(ws, x, s)
        losses[alpha] = loss
        if loss < best_loss:
            best_alpha, best_loss, best_scale = alpha, loss, s
    return AlphaSearch(scale=best_scale, alpha=best_alpha, losses=losses)
