"""The reference dequantize-then-matmul: plain torch, the oracle every fast kernel is tested against.

It reads exactly the checkpoint tensors (``core/packing.py``, ``core/unpacked.py``), so if this agrees with
the storage's ``dequantize`` and a fast kernel agrees with this, the fast kernel computes what we ship.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from compress.core.packing import PackedWeight
from compress.core.scheme import QuantScheme
from compress.core.storage import WeightStorage


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmul runs in: ``x.dtype``, except half precision on the CPU runs in float32.

    CPU half matmuls are slow and accumulate differently across torch builds; float32 gives the
    oracle stable answers, and the result is cast back to ``x.dtype`` anyway.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def reference_matmul(x: Tensor, storage: WeightStorage, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, storage.dequantize(), bias)`` in the compute dtype, output in ``x.dtype``: any layout."""
    dtype = compute_dtype(x)
    w = storage.dequantize(dtype=dtype)
    b = None if bias is None else bias.to(dtype)
    return F.linear(x.to(dtype), w, b).to(x.dtype)


@lru_cache(maxsize=64)
def int_scheme(bits: int, group_size: int, symmetric: bool) -> QuantScheme:
    """The scheme behind the low-level op's scalars, built once per distinct triple (the op boundary of
    ``torch.library`` admits only tensors and scalars, so the typed storage is re-formed on its far side)."""
    return QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric)


def dequant_matmul_reference(
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
    bias: Tensor | None = None,
) -> Tensor:
    """The pack-quantized reference from loose tensors and scalars (the ``compress::dequant_matmul`` body)."""
    packed = PackedWeight(
        weight_packed=weight_packed,
        weight_scale=weight_scale,
        weight_zero_point=weight_zero_point,
        weight_g_idx=weight_g_idx,
        weight_shape=torch.tensor([out_features, in_features]),
        scheme=int_scheme(bits, group_size, symmetric),
    )
    return reference_matmul(x, packed, bias)
