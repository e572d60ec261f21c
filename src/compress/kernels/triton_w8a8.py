"""The "triton-w8a8" kernel path: W8A8 GEMMs on CUDA for int8 (``int-quantized``) and FP8 (``float-quantized``)
layers whose inputs are quantized too.

The input is quantized once per call in torch, exactly as the reference does (int8: per token,
``absmax / 127.5`` as compressed-tensors computes it; e4m3: per token or with the layer's static
``input_scale``), then one tiled kernel multiplies the codes as stored (``weight [out, in]``, read as the
``[K, N]`` operand through its strides, no transposed copy) and applies both scales in the epilogue:
``y[m, n] = acc[m, n] · s_x[m] · s_w[n] + b[n]``.

- int8: ``tl.dot`` of int8 tiles into an int32 accumulator (exact: ``K · 127²`` stays below 2³¹ up to
  K ≈ 133k), the integer GEMM tensor cores run; the scales applied in float32.
- FP8: e4m3 tiles upcast to float32 and ``tl.dot`` in IEEE fp32, so the result is the reference's arithmetic
  on every GPU (an e4m3 × e4m3 product is exact in fp32; only the summation order differs). On GPUs with FP8
  tensor cores (sm89+) an fp8 ``tl.dot`` would be the fast form; it is not enabled because it has never run
  here (no GPU in this project's CI).

Verification status: run ONLY under ``TRITON_INTERPRET=1`` on CPU tensors (``tests/kernels/test_triton_w8a8.py``:
int8 bit-exact accumulators, FP8 dynamic and static, bias, shapes that do not fill a tile). Not verified:
compilation and timings on a real GPU. Auto picks this path only for CUDA tensors (or under the interpreter).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.unpacked import FP8, FP8_MAX
from compress.kernels.fp8_act import is_w8a8_fp8, per_token_scale
from compress.kernels.int8_act import is_w8a8_int8, quantize_per_token
from compress.kernels.paths import KernelPath, register_path

if TYPE_CHECKING:
    from compress.kernels.quant_linear import QuantLinear

INTERPRETED: bool = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_M, BLOCK_N, BLOCK_K = (16, 32, 32) if INTERPRETED else (64, 64, 64)
"""Small tiles under the interpreter (it runs each program in numpy); a common W8A8 tile on GPUs otherwise."""


@triton.jit
def _w8a8_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K,
                 stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                 FLOAT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if FLOAT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k0 * BLOCK_K + rk
        a_mask = (rm[:, None] < M) & (kk[None, :] < K)
        b_mask = (rn[None, :] < N) & (kk[:, None] < K)
        a_ptrs = x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk
        b_ptrs = w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk
        if FLOAT:  # e4m3 has no literal fill value: masked lanes are zeroed after the upcast
            a = tl.where(a_mask, tl.load(a_ptrs, mask=a_mask).to(tl.float32), 0.0)
            b = tl.where(b_mask, tl.load(b_ptrs, mask=b_mask).to(tl.float32), 0.0)
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0)
            b = tl.load(b_ptrs, mask=b_mask, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, out,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def quantize_input(rows: Tensor, layer: QuantLinear) -> tuple[Tensor, Tensor]:
    """``rows [M, K]`` as the layer's input codes and their float32 scale per row ``[M]``."""
    if is_w8a8_int8(layer.scheme):
        q, scale = quantize_per_token(rows)
        return q.contiguous(), scale.reshape(-1).float().contiguous()
    args = layer.scheme.input_activations
    assert args is not None
    xf = rows.float()
    if args.dynamic:
        scale = per_token_scale(xf)  # [M, 1]
    else:
        scale = layer.input_scale.to(device=rows.device, dtype=torch.float32).reshape(1, 1).expand(rows.shape[0], 1)
    codes = torch.clamp(xf / scale, -FP8_MAX, FP8_MAX).to(FP8)
    return codes.contiguous(), scale.reshape(-1).contiguous()


def w8a8_matmul_triton(layer: QuantLinear, x: Tensor) -> Tensor:
    """The layer's W8A8 product on ``x [..., K]`` through ``_w8a8_kernel``, in ``x.dtype``."""
    if not x.dtype.is_floating_point or x.dtype == FP8:
        raise ValueError(f"inputs must be float16, bfloat16 or float32, got {x.dtype}")
    rows = x.reshape(-1, x.shape[-1])
    codes, x_scale = quantize_input(rows, layer)
    weight = layer.weight
    n, k = weight.shape
    w_scale = layer.weight_scale.float().reshape(-1)
    w_scale = (w_scale.expand(n) if w_scale.numel() == 1 else w_scale).contiguous()  # per-tensor FP8 weights
    out = torch.empty(rows.shape[0], n, dtype=torch.float32, device=x.device)
    bias = None if layer.bias is None else layer.bias.float().contiguous()
    grid = (triton.cdiv(rows.shape[0], BLOCK_M), triton.cdiv(n, BLOCK_N))
    _w8a8_kernel[grid](codes, weight, x_scale, w_scale, bias if bias is not None else w_scale, out,
                       rows.shape[0], n, k, codes.stride(0), codes.stride(1), weight.stride(0), weight.stride(1),
                       out.stride(0), out.stride(1), FLOAT=weight.dtype == FP8, HAS_BIAS=bias is not None,
                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out.reshape(*x.shape[:-1], n).to(x.dtype)


class TritonW8A8Path(KernelPath):
    """One tiled kernel for W8A8-int8 and W8A8-FP8 layers (their inputs quantized here, once per call)."""

    name = "triton-w8a8"
    formats = ("int-quantized", "float-quantized")
    devices = ("cuda", "cpu")  # cpu only under TRITON_INTERPRET=1 (tests); ``check`` says so
    quantizes_inputs = True

    def check(self, layer: QuantLinear) -> str | None:
        device = layer.weight.device
        if device.type != "cuda" and not (device.type == "cpu" and INTERPRETED
                                          and os.environ.get("TRITON_INTERPRET") == "1"):
            return f"the triton kernels run on CUDA tensors, this layer is on {device.type}"
        if not (is_w8a8_int8(layer.scheme) or is_w8a8_fp8(layer.scheme)):
            return f"it runs W8A8-int8 and W8A8-FP8 layers (weights and inputs quantized), not {layer.scheme.tag}"
        if layer.scheme.weights is not None and layer.scheme.weights.group_size not in (None, -1):
            return "it reads per-channel or per-tensor weight scales, not grouped ones"
        if layer.weight.numel() >= 2**31:
            return f"the weight has {layer.weight.numel()} elements, beyond the kernel's int32 indexing"
        return None

    def forward(self, layer: QuantLinear, x: Tensor) -> Tensor:
        try:
            return w8a8_matmul_triton(layer, x)
        except ValueError as error:
            raise CompressError(f"kernel triton-w8a8 cannot run this input: {error}") from None


TRITON_W8A8 = register_path(TritonW8A8Path(), auto_priority=1)
