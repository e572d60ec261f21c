"""``UnpackedWeight``: codes stored one per element in their own dtype, the layout compressed-tensors calls
``naive-quantized`` (aliases ``int-quantized`` and ``float-quantized``: the same tensors, one compressor).

Verified against the installed compressed-tensors (0.20, ``compressors/naive_quantized/base.py``,
``quantization/lifecycle/initialize.py`` and ``forward.py``); ``tests/core/test_unpacked.py`` re-checks it
against the package:

- ``P.weight``: the codes ``[out, in]`` in ``QuantizationArgs.pytorch_dtype()``: int8 for integer codes of
  up to 8 bits (signed, not offset), ``float8_e4m3fn`` for 8-bit float;
- ``P.weight_scale``: the model dtype, ``[1]`` per tensor, ``[out, 1]`` per channel, ``[out, n_groups]``
  per group;
- ``P.weight_zero_point``: asymmetric only (the compressor drops symmetric ones), the scale's shape, int8;
- reconstruction ``w = (q - zp) * s`` (integer) or ``w = q * s`` (float), computed in the scale dtype;
- ``P.input_scale``: only for static input activations (W8A8-FP8 ``--static``), ``[1]`` in the model dtype,
  the calibrated per-tensor scale a reader divides each input by (compressed-tensors ``initialize_qparams``
  gives strategy ``tensor`` the shape ``(1,)`` and the weight's dtype). Dynamic inputs store nothing.

Why a second integer layout next to pack-quantized: it is what llm-compressor writes for W8A8, and an
int8 tensor is what int8 GEMM kernels read directly. ``weight_shape`` is kept in memory only (a module
buffer that says ``[out, in]``), never written: these readers take the shape from ``weight``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme
from compress.core.storage import WeightStorage

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def fp8_round(t: Tensor) -> Tensor:
    """``clamp(t, ±448)`` rounded to the nearest e4m3 value (a saturating cast), back in float32."""
    return torch.clamp(t.float(), -FP8_MAX, FP8_MAX).to(FP8).float()


def fp8_scale(w: Tensor, scheme: QuantScheme) -> Tensor:
    """Min-max (absmax) FP8 weight scale in float32: ``[out, 1]`` per channel, ``[1]`` per tensor; ``absmax / 448``
    (compressed-tensors divides by half its code range, ``(448 - (-448)) / 2``), a zero scale replaced by eps."""
    absmax = w.detach().float().abs()
    absmax = absmax.amax(dim=1, keepdim=True) if scheme.w.strategy == "channel" else absmax.amax().reshape(1)
    scale = absmax / FP8_MAX
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).eps), scale)


def fp8_codes(w: Tensor, stored_scale: Tensor, scheme: QuantScheme) -> Tensor:
    """``clamp(w / s, ±448)`` as e4m3 codes ``[out, in]`` (``s``: the scale as stored)."""
    s = stored_scale.float().reshape(-1, 1) if scheme.w.strategy == "channel" else stored_scale.float().reshape(1, 1)
    return torch.clamp(w.detach().float() / s, -FP8_MAX, FP8_MAX).to(FP8).contiguous()


def fp8_static_scale(absmax: Tensor | float, dtype: torch.dtype) -> Tensor:
    """A calibrated FP8 scale of any shape in its storage dtype: ``absmax / 448`` rounded to ``dtype``; a zero
    (a tensor that only ever saw zeros) becomes the dtype's eps, as compressed-tensors' ``calculate_qparams``
    does. Static input scales and KV-cache scales are both made here."""
    scale = (torch.as_tensor(absmax, dtype=torch.float32) / FP8_MAX).to(dtype)
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(dtype).eps), scale).contiguous()


def stored_input_scale(absmax: Tensor | float, dtype: torch.dtype) -> Tensor:
    """The static per-tensor input scale ``[1]`` from the calibration's largest ``|x|`` (``fp8_static_scale``)."""
    return fp8_static_scale(torch.as_tensor(absmax, dtype=torch.float32).reshape(1), dtype)


def fp8_quant_dequant(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` through e4m3 with ``scale`` (broadcast against ``x``) and back: ``e4m3(clamp(x / s, ±448)) · s`` in
    float32, returned in ``x.dtype`` (compressed-tensors' fake quantization for float args)."""
    s = scale.to(device=x.device, dtype=torch.float32)
    return (fp8_round(x.float() / s) * s).to(x.dtype)


def code_dtype(scheme: QuantScheme) -> torch.dtype:
    """The dtype compressed-tensors stores codes of ``scheme`` in (``QuantizationArgs.pytorch_dtype``)."""
    return FP8 if scheme.w.type == "float" else torch.int8


def scale_shape(scheme: QuantScheme, out_features: int, in_features: int) -> tuple[int, ...]:
    """``weight_scale`` shape for a strategy, as compressed-tensors initialises it."""
    w = scheme.w
    if w.strategy == "tensor":
        return (1,)
    if w.strategy == "channel":
        return (out_features, 1)
    if w.strategy == "group":
        return (out_features, math.ceil(in_features / w.group_size))  # type: ignore[operator]
    raise CompressError(f"weights cannot be stored with strategy {w.strategy}")


def spread(t: Tensor, scheme: QuantScheme, out_features: int, in_features: int) -> Tensor:
    """Per-tensor / per-channel / per-group values ``t`` broadcast to every weight ``[out, in]``."""
    w = scheme.w
    if w.strategy == "group":
        return t.repeat_interleave(w.group_size, dim=1)[:, :in_features]  # type: ignore[arg-type]
    return t.reshape(-1, 1).expand(out_features, in_features) if w.strategy == "channel" \
        else t.reshape(1, 1).expand(out_features, in_features)


@dataclass
class UnpackedWeight(WeightStorage):
    """One code per element (int8 or FP8) plus scales and, asymmetric integer only, zero points; with static
    input activations, the layer's calibrated ``input_scale`` too."""

    weight: Tensor
    weight_scale: Tensor
    weight_zero_point: Tensor | None
    weight_shape: Tensor | None
    scheme: QuantScheme
    input_scale: Tensor | None = None

    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("weight", "weight_scale", "weight_zero_point", "weight_shape",
                                                "input_scale")
    PERSISTENT: ClassVar[frozenset[str]] = frozenset({"weight", "weight_scale", "weight_zero_point", "input_scale"})

    def __post_init__(self) -> None:
        if self.weight_shape is None:  # derived, so parameter counts see [out, in] as for packed layers
            self.weight_shape = torch.tensor(list(self.weight.shape), dtype=torch.int64, device=self.weight.device)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def scale(self) -> Tensor:
        return self.weight_scale

    @classmethod
    def empty(cls, out_features: int, in_features: int, scheme: QuantScheme, *, scale_dtype: torch.dtype,
              has_g_idx: bool = False, device: torch.device | str | None = None) -> UnpackedWeight:
        if has_g_idx:
            raise CompressError("the unpacked layout has no g_idx")
        shape = scale_shape(scheme, out_features, in_features)
        return cls(
            weight=torch.zeros(out_features, in_features, dtype=code_dtype(scheme), device=device),
            weight_scale=torch.ones(shape, dtype=scale_dtype, device=device),
            weight_zero_point=None if scheme.symmetric else torch.zeros(shape, dtype=torch.int8, device=device),
            weight_shape=None,
            scheme=scheme,
            input_scale=torch.ones(1, dtype=scale_dtype, device=device) if scheme.has_static_inputs else None,
        )

    @classmethod
    def from_tensors(cls, prefix: str, tensors: Mapping[str, Tensor], scheme: QuantScheme) -> UnpackedWeight:
        def fail(name: str, detail: str) -> CompressError:
            return CompressError(f"tensor {prefix}.{name} {detail}")

        def get(name: str) -> Tensor:
            t = tensors.get(f"{prefix}.{name}")
            if t is None:
                raise fail(name, "is missing")
            return t

        weight = get("weight")
        want = code_dtype(scheme)
        if weight.dtype != want or weight.ndim != 2:
            raise fail("weight", f"is {weight.dtype} {list(weight.shape)}, expected 2-D {want} codes for {scheme.tag}")
        out_f, in_f = weight.shape
        shape = scale_shape(scheme, out_f, in_f)
        scale = get("weight_scale")
        if not scale.dtype.is_floating_point or scale.dtype == FP8 or tuple(scale.shape) != shape:
            raise fail("weight_scale", f"is {scale.dtype} {list(scale.shape)}, expected a float {list(shape)} "
                                       f"for {scheme.tag}")
        zp = None
        if not scheme.symmetric:
            zp = get("weight_zero_point")
            if zp.dtype.is_floating_point or zp.dtype == torch.bool or tuple(zp.shape) != shape:
                raise fail("weight_zero_point", f"is {zp.dtype} {list(zp.shape)}, expected integers {list(shape)}")
        if scheme.w.type == "int":
            lo, hi = int(weight.min()) if weight.numel() else 0, int(weight.max()) if weight.numel() else 0
            if lo < scheme.qmin or hi > scheme.qmax:
                raise fail("weight", f"holds codes outside the signed {scheme.bits}-bit range")
        input_scale = None
        if scheme.has_static_inputs:
            input_scale = get("input_scale")
            if not input_scale.dtype.is_floating_point or input_scale.dtype == FP8 or tuple(input_scale.shape) != (1,) \
                    or not bool(torch.isfinite(input_scale).all()) or float(input_scale.float().min()) <= 0:
                raise fail("input_scale", f"is {input_scale.dtype} {list(input_scale.shape)}, expected one positive "
                                          f"float [1] for {scheme.tag}")
        return cls(weight, scale, zp, None, scheme, input_scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(q - zp) * s`` in float32 (exact: at most 8+8 significant bits), then ``dtype`` (what the reader's
        product in the scale dtype rounds to as well)."""
        out_f, in_f = self.out_features, self.in_features
        vals = self.weight.float()
        if self.weight_zero_point is not None:
            vals = vals - spread(self.weight_zero_point.float(), self.scheme, out_f, in_f)
        return (vals * spread(self.weight_scale.float(), self.scheme, out_f, in_f)).to(dtype)
