"""``compress::dequant_matmul``: one torch.library op, many device implementations, and the typed entry.

Callers hand over a layer's typed storage (``dequant_matmul(x, storage, bias)``): the storage carries its
scheme, so nothing is re-derived per call. Underneath, a pack-quantized storage goes through the
low-level op ``compress::dequant_matmul`` (declared once here, tensors and scalars only, as torch.library
requires; the reference as the default for every device and a fake so ``torch.compile`` traces through
it without graph breaks). Other layouts (int8/FP8 codes, ``core/unpacked.py``) dequantize with plain
elementwise torch, which compiles as is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.core.packing import PackedWeight
from compress.core.storage import WeightStorage
from compress.kernels.reference import dequant_matmul_reference, reference_matmul


@torch.library.custom_op("compress::dequant_matmul", mutates_args=())
def dequant_matmul_op(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    weight_g_idx: Tensor | None,
    bits: int,
    group_size: int,
    symmetric: bool,
    out_features: int,
    in_features: int,
    bias: Tensor | None,
) -> Tensor:
    """Default implementation (all devices): the reference."""
    return dequant_matmul_reference(
        x,
        weight_packed,
        weight_scale,
        weight_zero_point,
        weight_g_idx,
        bits,
        group_size,
        symmetric,
        out_features,
        in_features,
        bias,
    )


@dequant_matmul_op.register_fake
def _dequant_matmul_fake(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    weight_g_idx: Tensor | None,
    bits: int,
    group_size: int,
    symmetric: bool,
    out_features: int,
    in_features: int,
    bias: Tensor | None,
) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def packed_matmul(x: Tensor, packed: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """The low-level op for a pack-quantized storage. Sizes come from static shapes (rows of the codes,
    width of ``x``), never from the ``weight_shape`` values, so a compiled graph has no data-dependent ints."""
    s = packed.scheme
    return dequant_matmul_op(
        x,
        packed.weight_packed,
        packed.weight_scale,
        packed.weight_zero_point,
        packed.weight_g_idx,
        s.bits,
        s.group_size,
        s.symmetric,
        packed.weight_packed.shape[0],
        x.shape[-1],
        bias,
    )


def dequant_matmul(x: Tensor, storage: WeightStorage, bias: Tensor | None = None) -> Tensor:
    """``x @ W^T + bias`` for any quantized storage, by the reference (dispatched per device for packed)."""
    if isinstance(storage, PackedWeight):
        return packed_matmul(x, storage, bias)
    return reference_matmul(x, storage, bias)
