"""``float-quantized``: FP8 (e4m3) weights, one scale per output channel or per tensor (W8A16-FP8).

The codes are stored one per element as ``float8_e4m3fn`` in ``P.weight`` with ``P.weight_scale`` in the
model dtype (``core/unpacked.py``, the layout compressed-tensors shares between its naive/int/float
compressors); a reader computes ``w = q * s``. Numerics follow compressed-tensors
(``quantization/utils/helpers.py`` ``calculate_qparams``): symmetric only, ``s = absmax / 448`` (448 is
the largest e4m3 value; the package divides the absmax by half the code range, ``(448 - (-448)) / 2``), a
zero scale replaced by eps, and ``q = clamp(w / s, -448, 448)`` cast to e4m3 (round to nearest even).

As with ``pack_weight``, the scale is rounded to its storage dtype *before* the codes are computed, so the
codes are the ones a reader, who sees only the stored scale, would have produced. The forward is the
reference dequantize-then-matmul (``kernels/ops.py``); under ``kernel=auto`` the layer runs dense from a
weight dequantized once at load (no packed kernel serves FP8 on the CPU), so it is never slower than dense.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from compress.codecs.base import (
    NO_ACTIVATIONS,
    HeaderMeta,
    StorageCodec,
    expect_headers,
    header_fail,
    register,
)
from compress.core.errors import CompressError
from compress.core.packing import scale_dtype_for
from compress.core.scheme import QuantScheme
from compress.core.unpacked import FP8, UnpackedWeight, scale_shape

FP8_MAX = float(torch.finfo(FP8).max)  # 448
STRATEGIES = ("channel", "tensor")


def fp8_scale(w: Tensor, scheme: QuantScheme) -> Tensor:
    """Min-max (absmax) scale in float32: ``[out, 1]`` per channel, ``[1]`` per tensor."""
    absmax = w.detach().float().abs()
    absmax = absmax.amax(dim=1, keepdim=True) if scheme.w.strategy == "channel" else absmax.amax().reshape(1)
    scale = absmax / FP8_MAX
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).eps), scale)


def fp8_codes(w: Tensor, stored_scale: Tensor, scheme: QuantScheme) -> Tensor:
    """``clamp(w / s, ±448)`` as e4m3 codes ``[out, in]``."""
    s = stored_scale.float().reshape(-1, 1) if scheme.w.strategy == "channel" else stored_scale.float().reshape(1, 1)
    return torch.clamp(w.detach().float() / s, -FP8_MAX, FP8_MAX).to(FP8).contiguous()


class FloatQuantizedCodec(StorageCodec):
    name = "float-quantized"
    marker = "weight_scale"
    leaves = ("weight", "weight_scale")
    code_leaves = ("weight",)
    scale_leaf = "weight_scale"
    storage_cls = UnpackedWeight

    def claims(self, prefix: str, names: set[str]) -> bool:
        return f"{prefix}.weight" in names and f"{prefix}.weight_packed" not in names

    def unsupported(self, scheme: QuantScheme | None) -> str | None:
        w = None if scheme is None else scheme.weights
        if w is None:
            return "it stores quantized weights and this scheme has none"
        if scheme.input_activations is not None:  # type: ignore[union-attr]
            return NO_ACTIVATIONS
        if w.type != "float" or w.num_bits != 8:
            return f"it holds 8-bit float (e4m3) codes, not {w.num_bits}-bit {w.type} ones"
        if w.strategy not in STRATEGIES:
            return f"its scales are per channel or per tensor, not per {w.strategy}"
        if not w.symmetric:
            return "FP8 codes are symmetric (no zero points)"
        return None

    def encode_storage(self, weight: Tensor, scheme: QuantScheme, *, scale: Tensor | None = None,
                       scale_dtype: torch.dtype | None = None, **unused: Any) -> UnpackedWeight:
        self.check(scheme)
        if any(v is not None for v in unused.values()):
            raise CompressError(f"{self.name} takes a scale only (no zero points, no g_idx)")
        if weight.ndim != 2:
            raise CompressError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
        dtype = scale_dtype or scale_dtype_for(weight.dtype)
        scale = fp8_scale(weight, scheme) if scale is None else scale
        want = scale_shape(scheme, *weight.shape)
        if tuple(scale.shape) != want:
            raise CompressError(f"scale has shape {tuple(scale.shape)}, expected {want}")
        stored = scale.detach().to(dtype)
        stored = torch.where(stored == 0, torch.full_like(stored, torch.finfo(dtype).tiny), stored).contiguous()
        return UnpackedWeight(fp8_codes(weight, stored, scheme), stored, None, None, scheme)

    def config(self, scheme: QuantScheme | None, *, observer: str | None = "minmax", **_: Any) -> dict[str, Any]:
        return self.scheme_group(scheme, observer=observer)

    def header_shape(self, prefix: str, meta: HeaderMeta, scheme: QuantScheme | None,
                     values: Mapping[str, list[int]]) -> tuple[int, int]:
        assert scheme is not None
        self.check(scheme, f"layer {prefix}: ")
        dtype, shape = meta[f"{prefix}.weight"]
        if dtype != "F8_E4M3" or len(shape) != 2:
            raise header_fail(prefix, "weight", f"is {dtype} {shape}, expected 2-D F8_E4M3 codes")
        expect_headers(prefix, meta, {"weight_scale": list(scale_shape(scheme, *shape))}, f"scheme {scheme.tag}")
        return shape[0], shape[1]


FLOAT_QUANTIZED = register(FloatQuantizedCodec())
