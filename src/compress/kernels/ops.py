"""``compress::dequant_matmul``: one torch.library op, many device implementations.

The op is declared once here with the reference implementation as the default for every device and a
fake (meta) implementation so ``torch.compile`` can trace through it. Faster paths register
themselves for their device (``dequant_matmul_op.register_kernel("cpu")`` / ``"cuda"``), so callers
such as ``QuantLinear`` never branch on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.core.packing import PackedWeight
from compress.kernels.reference import dequant_matmul_reference


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


def dequant_matmul(x: Tensor, packed: PackedWeight, bias: Tensor | None = None) -> Tensor:
    """``x @ W^T + bias`` for a packed weight, dispatched to the best implementation for ``x.device``."""
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
        packed.out_features,
        packed.in_features,
        bias,
    )
