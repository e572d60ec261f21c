"""``naive-quantized`` / ``int-quantized``: integer codes as an int8 ``weight`` tensor (``core/unpacked.py``).

compressed-tensors writes this layout for W8A8-int8 models (``int-quantized``; ``naive-quantized`` is the
same compressor under its generic name). The codes are the ones ``pack-quantized`` would hold (encoded
through the same ``pack_weight`` arithmetic, then unpacked), so a model can move between the two layouts
without re-quantizing. Input activations: W8A8-int8 (compressed-tensors' ``W8A8`` preset: int8 symmetric
per-channel weights, int8 symmetric per-token dynamic activations) is held and run (``kernels/int8_act.py``
quantizes each input row at run time); any other activation scheme is refused in one sentence, since
running it with float activations would compute something else than what was calibrated.
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
from compress.core.packing import pack_weight, scale_dtype_for, unpack_zero_point
from compress.core.scheme import QuantScheme
from compress.core.unpacked import UnpackedWeight, scale_shape
from compress.kernels.int8_act import is_w8a8_int8


class NaiveQuantizedCodec(StorageCodec):
    """Integer codes one per int8 element; registered under both compressed-tensors names."""

    marker = "weight_scale"
    leaves = ("weight", "weight_scale", "weight_zero_point")
    code_leaves = ("weight",)
    scale_leaf = "weight_scale"
    storage_cls = UnpackedWeight
    code_type = "int"
    header_dtype = "I8"

    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]  (one class, two registered names)

    def claims(self, prefix: str, names: set[str]) -> bool:
        """Codes in ``P.weight`` next to ``P.weight_scale``, and no packed codes (those are pack-quantized)."""
        return f"{prefix}.weight" in names and f"{prefix}.weight_scale" in names \
            and f"{prefix}.weight_packed" not in names

    def unsupported(self, scheme: QuantScheme | None) -> str | None:
        if scheme is None or scheme.weights is None:
            return "it stores quantized weights and this scheme has none"
        if scheme.input_activations is not None and not is_w8a8_int8(scheme):
            return NO_ACTIVATIONS
        if scheme.weights.type != self.code_type:
            return f"it holds {self.code_type} codes here, not {scheme.weights.type} ones"
        return None

    def encode_storage(self, weight: Tensor, scheme: QuantScheme, *, scale: Tensor | None = None,
                       zero_point: Tensor | None = None, g_idx: Tensor | None = None,
                       scale_dtype: torch.dtype | None = None) -> UnpackedWeight:
        if g_idx is not None:
            raise CompressError(f"{self.name} has no g_idx; activation ordering must keep groups contiguous")
        packed = pack_weight(weight, scheme.weight_only, scale=scale, zero_point=zero_point,
                             scale_dtype=scale_dtype or scale_dtype_for(weight.dtype))
        codes, _, _ = packed.unpack()
        zp = None
        if packed.weight_zero_point is not None:
            zp = unpack_zero_point(packed.weight_zero_point, scheme.bits, packed.out_features).to(torch.int8)
        return UnpackedWeight(codes.contiguous(), packed.weight_scale, zp, None, scheme)  # with its activations

    def config(self, scheme: QuantScheme | None, *, actorder: str | None = None,
               observer: str | None = "minmax", **_: Any) -> dict[str, Any]:
        return self.scheme_group(scheme, actorder=actorder, observer=observer)

    def header_shape(self, prefix: str, meta: HeaderMeta, scheme: QuantScheme | None,
                     values: Mapping[str, list[int]]) -> tuple[int, int]:
        assert scheme is not None
        self.check(scheme, f"layer {prefix}: ")
        dtype, shape = meta[f"{prefix}.weight"]
        if dtype != self.header_dtype or len(shape) != 2:
            raise header_fail(prefix, "weight", f"is {dtype} {shape}, expected 2-D {self.header_dtype} codes")
        out_f, in_f = shape
        expected = {"weight_scale": list(scale_shape(scheme, out_f, in_f))}
        if not scheme.symmetric:
            expected["weight_zero_point"] = expected["weight_scale"]
        expect_headers(prefix, meta, expected, f"scheme {scheme.tag}")
        return out_f, in_f


NAIVE_QUANTIZED = register(NaiveQuantizedCodec("naive-quantized"))
INT_QUANTIZED = register(NaiveQuantizedCodec("int-quantized"))
