"""The arithmetic of learned rounding (SignRound / AutoRound, Cheng et al. 2023), as pure tensor functions.

Each weight gets a rounding offset ``v ∈ [-½, ½]`` added before rounding, and each (row, group) two
range factors ``α, β ∈ [½, 1]`` that shrink its observed min and max before the scale is derived. With
``v = 0`` and ``α = β = 1`` this is exactly round-to-nearest with min/max scales
(``primitives.qparams_from_range`` and ``quantize``): the learned solution starts at RTN and can only move
from it by what the block-output loss asks for.

The same formulas serve training (float32 scale, straight-through rounding so gradients reach ``v``,
``α`` and ``β``) and the final codes (scale rounded through its storage dtype first, so the codes are the
ones a reader holding the stored scale dequantizes): ``q = round(clamp(w / s + z + v, qmin, qmax))``,
``ŵ = (q - z) · s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from compress.core.scheme import QuantScheme
from compress.passes._obs import storable_scale

RANGE_MIN = 0.5
"""Lowest range factor: AutoRound's bound; a group never clips more than half its range."""
_EPS = torch.finfo(torch.float32).eps


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (x.round() - x).detach()


@dataclass
class Rounding:
    """The learnable state of one layer: ``v`` ``[out, in]``, ``alpha``/``beta`` ``[out, n_groups]``."""

    v: Tensor
    alpha: Tensor
    beta: Tensor

    @classmethod
    def start(cls, weight: Tensor, scheme: QuantScheme, *, learn_range: bool = True) -> Rounding:
        """The round-to-nearest starting point (requires_grad set on what is learned)."""
        out_f, in_f = weight.shape
        n_groups = scheme.n_groups(in_f)
        ones = torch.ones(out_f, n_groups, dtype=torch.float32, device=weight.device)
        v = torch.zeros(out_f, in_f, dtype=torch.float32, device=weight.device).requires_grad_(True)
        return cls(v, ones.clone().requires_grad_(learn_range), ones.clone().requires_grad_(learn_range))

    def parameters(self) -> list[Tensor]:
        return [t for t in (self.v, self.alpha, self.beta) if t.requires_grad]

    def clamp_(self) -> None:
        """Project back onto the feasible box after a step."""
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)
            self.alpha.clamp_(RANGE_MIN, 1.0)
            self.beta.clamp_(RANGE_MIN, 1.0)

    def snapshot(self) -> Rounding:
        return Rounding(self.v.detach().clone(), self.alpha.detach().clone(), self.beta.detach().clone())


def _grouped(w: Tensor, scheme: QuantScheme) -> Tensor:
    out_f, in_f = w.shape
    gs = scheme.effective_group_size(in_f)
    return w.reshape(out_f, in_f // gs, gs)


def learned_qparams(w: Tensor, scheme: QuantScheme, state: Rounding) -> tuple[Tensor, Tensor]:
    """Scale and (float, integral-valued) zero point ``[out, n_groups]`` from the shrunk range, with the
    formulas of ``qparams_from_range``; differentiable in ``alpha``/``beta`` (zero point rounded with STE)."""
    grouped = _grouped(w.float(), scheme)
    mins = torch.clamp(grouped.amin(dim=-1), max=0.0) * state.alpha
    maxs = torch.clamp(grouped.amax(dim=-1), min=0.0) * state.beta
    span = float(scheme.qmax - scheme.qmin)
    if scheme.symmetric:
        scale = torch.maximum(mins.abs(), maxs.abs()) / (span / 2)
        scale = torch.where(scale == 0, torch.full_like(scale, _EPS), scale)
        return scale, torch.zeros_like(scale)
    scale = (maxs - mins) / span
    scale = torch.where(scale == 0, torch.full_like(scale, _EPS), scale)
    zp = round_ste(torch.clamp(scheme.qmin - mins / scale, scheme.qmin, scheme.qmax))
    return scale, zp


def _codes(w: Tensor, scale: Tensor, zp: Tensor, v: Tensor, scheme: QuantScheme, rounder) -> Tensor:
    grouped = _grouped(w.float(), scheme)
    shifted = grouped / scale.unsqueeze(-1) + zp.unsqueeze(-1) + _grouped(v, scheme)
    return rounder(torch.clamp(shifted, scheme.qmin, scheme.qmax))


def fake_quantize(w: Tensor, scheme: QuantScheme, state: Rounding) -> Tensor:
    """The dequantized weight under ``state``, differentiable in it (float32 ``[out, in]``)."""
    scale, zp = learned_qparams(w, scheme, state)
    q = _codes(w, scale, zp, state.v, scheme, round_ste)
    return ((q - zp.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(w.shape)


def final_codes(w: Tensor, scheme: QuantScheme, state: Rounding,
                scale_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(int8 codes ``[out, in]``, float32 scale representable in ``scale_dtype``, int32 zero point): what is
    stored. The zero point comes from the float32 scale (as ``qparams_from_range`` computes it), the codes
    from the stored one."""
    with torch.no_grad():
        scale, zp = learned_qparams(w, scheme, state)
        stored = storable_scale(scale, scale_dtype)
        codes = _codes(w, stored, zp, state.v, scheme, torch.round).reshape(w.shape)
    return codes.to(torch.int8), stored, zp.to(torch.int32)
