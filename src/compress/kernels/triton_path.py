"""The "triton" kernel path: fused dequantize + GEMM/GEMV on CUDA (``triton_gemm.py``).

Importing this module registers the path first in the auto order; when triton is not installed the
import of ``triton_gemm`` raises ImportError and ``paths._import_paths`` skips it, so the toolkit works
without triton. Auto must never pick this path on the CPU: ``unsupported`` refuses non-CUDA tensors,
except under ``TRITON_INTERPRET=1`` (tests run the kernels on CPU tensors through the interpreter).

The path reads the checkpoint buffers as they are (no ``prepare`` repacking), so a layer on this path
holds exactly the bytes of the compressed checkpoint. It does not register itself as the CUDA
implementation of ``compress::dequant_matmul``: that op stays the reference, the oracle a forced
``kernel="reference"`` must reach on every device.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from torch import Tensor

from compress.core.errors import CompressError
from compress.core.packing import SCALE_DTYPES, PackedWeight
from compress.kernels import triton_gemm  # raises ImportError without triton: the path is then skipped
from compress.kernels.paths import KernelPath, register_path

if TYPE_CHECKING:
    from compress.kernels.quant_linear import QuantLinear

SUPPORTED_BITS = (2, 3, 4, 8)


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (tests), read at call time."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonPath(KernelPath):
    """Fused dequantize-matmul kernels: GEMV for M <= 4 rows (decode), tiled GEMM otherwise (prefill)."""

    name = "triton"
    formats = ("pack-quantized",)
    devices = ("cuda", "cpu")  # cpu only under TRITON_INTERPRET=1 (tests); ``check`` says so

    def check(self, layer: QuantLinear) -> str | None:
        device = layer.weight_packed.device
        if device.type != "cuda" and not (device.type == "cpu" and interpreting() and triton_gemm.INTERPRETED):
            return f"the triton kernels run on CUDA tensors, this layer is on {device.type}"
        s = layer.scheme
        if s.bits not in SUPPORTED_BITS:
            return f"the triton kernels support {', '.join(map(str, SUPPORTED_BITS))}-bit codes, not {s.bits}"
        if layer.weight_scale.dtype not in SCALE_DTYPES:
            return f"the triton kernels read float16/bfloat16/float32 scales, not {layer.weight_scale.dtype}"
        tensors = {"weight_packed": layer.weight_packed, "weight_scale": layer.weight_scale}
        if layer.weight_zero_point is not None:
            tensors["weight_zero_point"] = layer.weight_zero_point
        if layer.weight_g_idx is not None:
            tensors["weight_g_idx"] = layer.weight_g_idx
        for name, t in tensors.items():
            if not t.is_contiguous():
                return f"the triton kernels need a contiguous {name}"
            if t.numel() >= 2**31:
                return f"{name} has {t.numel()} elements, beyond the kernels' int32 indexing"
        if layer.bias is not None and not layer.bias.is_contiguous():
            return "the triton kernels need a contiguous bias"
        return None

    def forward(self, layer: QuantLinear, x: Tensor) -> Tensor:
        try:
            return packed_matmul_triton(x, layer.packed(), layer.bias)
        except ValueError as e:  # activation the kernels cannot take (dtype, size): one sentence, no fallback
            raise CompressError(f"kernel triton cannot run this input: {e}") from None


def packed_matmul_triton(x: Tensor, packed: PackedWeight, bias: Tensor | None = None, *, mode: str = "auto") -> Tensor:
    """The fused kernels for a pack-quantized storage (its scheme says bits and groups; sizes are the static
    shapes of the codes and of ``x``)."""
    s = packed.scheme
    return triton_gemm.dequant_matmul_triton(
        x, packed.weight_packed, packed.weight_scale, packed.weight_zero_point, packed.weight_g_idx, s.bits,
        s.group_size, packed.weight_packed.shape[0], x.shape[-1], bias, mode=mode)


TRITON = register_path(TritonPath(), auto_priority=0)
