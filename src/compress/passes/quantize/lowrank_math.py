"""Low-rank compensation of a quantization error in the activation-weighted norm (EoRA), as pure functions.

Given a layer's weight ``W``, its quantized weight ``Ŵ`` and the calibration second moment
``H = XᵀX / n`` of its inputs, find rank-``r`` factors ``B [out, r]``, ``A [r, in]`` minimising the output
error ``‖(ΔW - B A) X‖_F`` with ``ΔW = W - Ŵ`` (EoRA, Liu et al. 2024; NNCF's "LoRA correction").
Since ``‖M X‖²_F = n · tr(M H Mᵀ)`` and ``H = V Λ Vᵀ``, the error is the Frobenius norm of ``M V √Λ``:
project ``ΔW' = ΔW V √Λ``, keep the top-``r`` singular triplets of ``ΔW'`` (Eckart-Young: the best
rank-``r`` approximation in that norm), and map the right factor back, ``A = A' √Λ⁻¹ Vᵀ``.
ZeroQuant-V2's LoRC is the unweighted case ``H = I``.

Tiny eigenvalues (directions the calibration never excited) would blow ``√Λ⁻¹`` up, so ``Λ`` is damped:
``Λ + δ`` with ``δ = damp · mean(Λ)``. That is the exact minimiser of ``tr(M (H + δI) Mᵀ)``, the output error
plus a small ridge on the weight error, so the factors stay bounded and still fit unseen directions a little.

The singular values are split evenly between the factors (``B = U √S``, ``A = √S V'ᵀ ...``) so that neither
factor's entries grow large when stored in float16.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.core.errors import CompressError


def _check(delta: Tensor, hessian: Tensor | None, rank: int) -> None:
    if delta.ndim != 2:
        raise CompressError(f"expected a 2-D weight error, got shape {tuple(delta.shape)}")
    out_f, in_f = delta.shape
    if not 0 < rank <= min(out_f, in_f):
        raise CompressError(f"rank {rank} must be at least 1 and at most min(out, in) = {min(out_f, in_f)} for a "
                            f"{out_f}x{in_f} layer")
    if hessian is not None and tuple(hessian.shape) != (in_f, in_f):
        raise CompressError(f"a Hessian of shape {tuple(hessian.shape)} does not match a layer with {in_f} inputs")


def hessian_eigen(hessian: Tensor, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """``(Λ, V)`` of the symmetrised Hessian in float64 (eigenvalues clamped at 0): computed once per
    accumulator and reused by the layers that share it (q/k/v, gate/up)."""
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise CompressError(f"expected a square Hessian, got shape {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise CompressError("the calibration Hessian holds NaN or infinite values")
    h = hessian.detach().to(device=device or hessian.device, dtype=torch.float64)
    eigenvalues, vectors = torch.linalg.eigh((h + h.T) / 2)
    return eigenvalues.clamp_min(0), vectors


def weighted_lowrank(delta: Tensor, hessian: Tensor, rank: int, *, damp: float = 0.01,
                     eigen: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(A [r, in], B [out, r])`` in float32 minimising ``tr((ΔW - BA)(H + δI)(ΔW - BA)ᵀ)``.

    Computed in float64 on ``delta``'s device; ``hessian`` is any positive semi-definite ``[in, in]``
    (the factor 2 of ``HessianStats`` changes nothing). ``eigen``: ``hessian_eigen(hessian)``, when known."""
    _check(delta, hessian, rank)
    d = delta.detach().to(torch.float64)
    eigenvalues, vectors = eigen if eigen is not None else hessian_eigen(hessian, d.device)
    eigenvalues, vectors = eigenvalues.to(d.device), vectors.to(d.device)
    mean = float(eigenvalues.mean())
    if mean <= 0:
        raise CompressError("the calibration Hessian is zero: the layer saw no input, so no weighting exists")
    root = (eigenvalues + damp * mean).sqrt()
    projected = (d @ vectors) * root  # ΔW V √Λ
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    half = s[:rank].sqrt()
    b = u[:, :rank] * half
    a = (half[:, None] * vh[:rank]) / root @ vectors.T  # √S V'ᵀ √Λ⁻¹ Vᵀ
    return a.to(torch.float32), b.to(torch.float32)


def plain_lowrank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The unweighted truncated SVD of ``ΔW`` (ZeroQuant-V2's LoRC): the comparison point of the tests."""
    _check(delta, None, rank)
    u, s, vh = torch.linalg.svd(delta.detach().to(torch.float64), full_matrices=False)
    half = s[:rank].sqrt()
    return (half[:, None] * vh[:rank]).to(torch.float32), (u[:, :rank] * half).to(torch.float32)


def weighted_error(delta: Tensor, hessian: Tensor, a: Tensor | None = None, b: Tensor | None = None) -> float:
    """``tr((ΔW - BA) H (ΔW - BA)ᵀ)``: the output error (per token, up to the Hessian's factor) left after the
    compensation (all of ``ΔW`` without factors)."""
    residual = delta.detach().to(torch.float64)
    if a is not None and b is not None:
        residual = residual - b.to(residual) @ a.to(residual)
    h = hessian.detach().to(device=residual.device, dtype=torch.float64)
    return float(((residual @ h) * residual).sum())
