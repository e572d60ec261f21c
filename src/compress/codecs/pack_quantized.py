"""``pack-quantized``: integer codes bit-packed into int32 words (compressed-tensors' W4A16 layout, 2/3/4/8 bit).

It also holds W4A8 (compressed-tensors' ``W4A8`` preset writes ``pack-quantized``): the layer's tensors are those
of W4A16, and only its config group's ``input_activations`` (int8 per token, dynamic) says that ``QuantLinear``
quantizes the input when it runs; no scale is stored for it. Other input quantization is refused (``unpackable``).

The layout itself (bit order, zero-point packing, shapes) is ``core/packing.py``; this module states how the
rest of the toolkit finds, describes and rebuilds it. It is what every quantization pass produces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from compress.codecs.base import HeaderMeta, StorageCodec, expect_headers, register
from compress.core.errors import CompressError
from compress.core.packing import PackedWeight, pack_weight, packed_size, scale_dtype_for, unpackable
from compress.core.scheme import QuantScheme


class PackQuantizedCodec(StorageCodec):
    name = "pack-quantized"
    marker = "weight_packed"
    leaves = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")
    code_leaves = ("weight_packed",)
    shape_leaves = ("weight_shape",)
    scale_leaf = "weight_scale"
    order_leaf = "weight_g_idx"
    storage_cls = PackedWeight

    def unsupported(self, scheme: QuantScheme | None) -> str | None:
        return "it needs a quantization scheme" if scheme is None else unpackable(scheme)

    def encode_storage(self, weight: Tensor, scheme: QuantScheme, *, scale: Tensor | None = None,
                       zero_point: Tensor | None = None, g_idx: Tensor | None = None,
                       scale_dtype: torch.dtype | None = None) -> PackedWeight:
        return pack_weight(weight, scheme, scale=scale, zero_point=zero_point, g_idx=g_idx,
                           scale_dtype=scale_dtype or scale_dtype_for(weight.dtype))

    def config(self, scheme: QuantScheme | None, *, actorder: str | None = None,
               observer: str | None = "minmax", has_g_idx: bool = False) -> dict[str, Any]:
        """A config group without targets. ``has_g_idx``: the layers carry ``weight_g_idx``, which only the
        ``actorder: group`` form explains (readers of ``weight`` ordering expect contiguous groups).

        W4A8 groups name their ``format``: compressed-tensors 0.20 (so transformers 5.24) takes a group's layout
        from the group alone, and for int weights with input activations infers ``int-quantized`` (one int8 per
        code, W8A8's), so without it the reader builds ``weight`` tensors the packed codes do not fit."""
        group = self.scheme_group(scheme, actorder="group" if has_g_idx else actorder, observer=observer)
        if scheme is not None and scheme.input_activations is not None:
            group["format"] = self.name
        return group

    def header_shape(self, prefix: str, meta: HeaderMeta, scheme: QuantScheme | None,
                     values: Mapping[str, list[int]]) -> tuple[int, int]:
        assert scheme is not None
        self.check(scheme, f"layer {prefix}: ")
        true_shape = values.get(f"{prefix}.weight_shape")
        if true_shape is None or len(true_shape) != 2:
            raise CompressError(f"quantized layer {prefix} has no valid weight_shape tensor")
        out_f, in_f = true_shape
        n_groups = scheme.n_groups(in_f)
        expected = {"weight_packed": [out_f, packed_size(in_f, scheme.bits)], "weight_scale": [out_f, n_groups]}
        if not scheme.symmetric:
            expected["weight_zero_point"] = [packed_size(out_f, scheme.bits), n_groups]
        if f"{prefix}.weight_g_idx" in meta:
            expected["weight_g_idx"] = [in_f]
        expect_headers(prefix, meta, expected, f"scheme {scheme.tag}")
        return out_f, in_f


PACK_QUANTIZED = register(PackQuantizedCodec())
