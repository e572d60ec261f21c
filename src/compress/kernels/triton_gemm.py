"""Triton kernels that dequantize compressed-tensors ``pack-quantized`` weights inside the matmul.

Why fused: a W4 weight is 1/4 of the fp16 bytes; dequantizing it to a dense tensor first would write and
re-read the full fp16 weight and lose the whole advantage. Both kernels read the checkpoint tensors as
stored (``core/packing.py``), with no repacking at load, so the GPU holds exactly the bytes we ship.

Bit layout handled in-kernel (``_unpack``): code ``k`` of a row occupies stream bits ``[k*b, (k+1)*b)``,
word ``(k*b) >> 5``, shift ``(k*b) & 31``; for b = 3 a code may straddle into the next word, so a second
word is read only for those codes (compile-time skipped for b in {2, 4, 8}). Zero points use the same
stream along the output dim. Stored codes are unsigned (``u = q + 2^(b-1)``) and so are stored zero
points, so ``w = (u - z_u) * s`` with ``z_u = 2^(b-1)`` when symmetric.

GEMM (prefill, M > 4): 2-D grid of ``BLOCK_M x BLOCK_N`` output tiles (swizzled in ``GROUP_M`` bands for
L2 reuse of the weight tiles), a K loop that gathers ``[BLOCK_K, BLOCK_N]`` codes (each word is read by
the 32/b lanes that need it; they hit L1), subtracts zero points, and feeds ``tl.dot`` in ``x.dtype``
with fp32 accumulation (IEEE fp32, not TF32, for fp32 activations). When the group is constant over a
K tile (no g_idx and group_size a multiple of BLOCK_K, or per-channel) the integer-valued ``u - z`` goes
into the dot and the scale is applied once per tile column (``acc += dot(x, u - z) * s``), which takes the
per-element multiply out of the inner loop; otherwise (act-order g_idx, small groups) scales and zero
points are gathered per K index.

GEMV (decode, M = 1..4): the checkpoint stores each output row's codes contiguously along K, so the
kernel gives each program a narrow band of ``BLOCK_N`` rows and a wide ``BLOCK_K`` strip (every row read
as whole 128-byte lines), all M rows of x at once (``BLOCK_M`` = next power of two, so the weight is
read exactly once), and reduces along K in registers with ``tl.sum`` in fp32. No split-K: at decode the
launch count matters as much as bandwidth (a 4096x4096 W4 weight is ~3 us of H100 HBM time), and split-K
needs a zeroed fp32 buffer, atomics and a cast kernel, and gives run-to-run nondeterminism. With
BLOCK_N down to 8 a 4096-row layer still launches 512 programs, several per SM. Narrow layers (N below
~1K with large K) would underfill the GPU; split-K is the follow-up for those.

Verification status: everything here has run ONLY under ``TRITON_INTERPRET=1`` on CPU tensors
(``tests/kernels/test_triton_path.py``: bits 2/3/4/8, group 32/64/per-channel, sym/asym, g_idx,
non-multiple shapes, fp32/bf16/fp16 activations, GEMV vs GEMM). Not verified: compilation for real GPUs
(layouts, register pressure of the autotune configs), the autotuned timings, the bandwidth claims above.

Triton is imported only by the ``kernels/triton_*.py`` modules (DESIGN layer rule).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRETED: bool = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether these kernels were decorated for the interpreter (decided by triton at decoration time)."""

GEMV_MAX_M = 4
_INT32_LIMIT = 2**31 - 1


def _gemm_configs() -> list[triton.Config]:
    """A few shapes that are sane on H100/A100 for int4 prefill; one small config under the interpreter."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4)]
    cfg = [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 128, 4, 3),
        (32, 64, 128, 4, 4),
        (16, 64, 128, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in cfg
    ]


def _gemv_configs() -> list[triton.Config]:
    """Narrow N bands, wide K strips (see module docstring)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    cfg = [(8, 512, 4), (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 8), (64, 128, 8)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=2) for n, k, w in cfg]


def _tile_group(args: dict) -> bool:
    """True when one scale column covers a whole K tile, so the scale can be applied after the dot."""
    group = args["GROUP_SIZE"]
    return not args["HAS_GIDX"] and (group == -1 or group % args["BLOCK_K"] == 0)


@triton.jit
def _unpack(ptrs, elem, stride, mask, BITS: tl.constexpr):
    """Unsigned ``BITS``-bit code number ``elem`` of the LSB-first bit stream whose word j is at ptrs + j*stride."""
    bit = elem * BITS
    word = bit >> 5
    shift = (bit & 31).to(tl.uint32)
    lo = tl.load(ptrs + word * stride, mask=mask, other=0).to(tl.uint32, bitcast=True)
    val = lo >> shift
    if 32 % BITS != 0:  # only 3-bit codes can straddle two words
        straddles = shift > 32 - BITS
        hi = tl.load(ptrs + (word + 1) * stride, mask=mask & straddles, other=0).to(tl.uint32, bitcast=True)
        val = val | tl.where(straddles, hi << ((32 - shift) & 31), 0)
    return (val & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` in fp32; IEEE (no TF32) for fp32 inputs; UPCAST works around the interpreter's bf16 dot.

    Triton 3.9's interpreter multiplies bfloat16 operands as their uint16 bit patterns; upcasting the
    (already bf16-rounded) operands gives the product the GPU's bf16 MMA computes, up to summation order.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "HAS_GIDX"])
@triton.heuristics({"TILE_GROUP": _tile_group})
@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_zw, stride_ym,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, TILE_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * num_n
    first_m = (pid // band) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows
    pid_n = (pid % band) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        mask_w = mask_k[:, None] & mask_n[None, :]
        u = _unpack(w_rows, offs_k[:, None], 1, mask_w, BITS)  # [BLOCK_K, BLOCK_N]
        if TILE_GROUP:  # one group for the whole K tile: scale after the dot
            if GROUP_SIZE == -1:
                g = 0
            else:
                g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_ZP:
                z = _unpack(z_ptr + g, offs_n, stride_zw, mask_n, BITS)
                q = u - z[None, :]
            else:
                q = u - (1 << (BITS - 1))
            acc += _dot(x, q.to(x.dtype), IEEE, UPCAST) * s[None, :]
        else:
            if HAS_GIDX:
                g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
            elif GROUP_SIZE == -1:
                g = offs_k * 0
            else:
                g = offs_k // GROUP_SIZE
            s = tl.load(s_ptr + offs_n[None, :] * stride_sn + g[:, None], mask=mask_w, other=0.0)
            if HAS_ZP:
                z = _unpack(z_ptr + g[:, None], offs_n[None, :], stride_zw, mask_w, BITS)
                q = u - z
            else:
                q = u - (1 << (BITS - 1))
            w = (q.to(tl.float32) * s.to(tl.float32)).to(x.dtype)
            acc += _dot(x, w, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.autotune(configs=_gemv_configs(), key=["N", "K", "BITS", "GROUP_SIZE", "HAS_GIDX", "BLOCK_M"])
@triton.heuristics({"TILE_GROUP": _tile_group})
@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_zw, stride_ym,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr,
    HAS_BIAS: tl.constexpr, TILE_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        mask_w = mask_n[:, None] & mask_k[None, :]
        u = _unpack(w_rows, offs_k[None, :], 1, mask_w, BITS)  # [BLOCK_N, BLOCK_K]
        if TILE_GROUP:
            if GROUP_SIZE == -1:
                g = 0
            else:
                g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_ZP:
                z = _unpack(z_ptr + g, offs_n, stride_zw, mask_n, BITS)
                q = (u - z[:, None]).to(tl.float32)
            else:
                q = (u - (1 << (BITS - 1))).to(tl.float32)
            acc += tl.sum(x[:, None, :] * q[None, :, :], axis=2) * s[None, :]
        else:
            if HAS_GIDX:
                g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
            elif GROUP_SIZE == -1:
                g = offs_k * 0
            else:
                g = offs_k // GROUP_SIZE
            s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=mask_w, other=0.0)
            if HAS_ZP:
                z = _unpack(z_ptr + g[None, :], offs_n[:, None], stride_zw, mask_w, BITS)
                q = u - z
            else:
                q = u - (1 << (BITS - 1))
            w = q.to(tl.float32) * s.to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _m_bucket(m: int) -> int:
    """Autotune key for M: powers of two up to 4096, so prompt lengths share tuned configs."""
    return min(triton.next_power_of_2(m), 4096)


def dequant_matmul_triton(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    weight_g_idx: Tensor | None,
    bits: int,
    group_size: int,
    out_features: int,
    in_features: int,
    bias: Tensor | None = None,
    *,
    mode: str = "auto",
) -> Tensor:
    """``x @ dequantize(W)^T + bias`` in ``x.dtype``; ``mode`` is auto (GEMV for M <= 4), gemm or gemv.

    The caller (``triton_path.TritonPath``) has checked the layer; this checks only the activation.
    ``weight_zero_point`` None means symmetric.
    """
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton kernels take float16, bfloat16 or float32 activations, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m, n, k = x2.shape[0], out_features, in_features
    if x2.numel() > _INT32_LIMIT or m * n > _INT32_LIMIT:
        raise ValueError(f"activation of shape {tuple(x.shape)} exceeds the kernels' int32 indexing")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    has_zp = weight_zero_point is not None
    has_gidx = weight_g_idx is not None
    # unused pointers still need a tensor argument; the constexpr flags keep them from being read
    z = weight_zero_point if has_zp else weight_packed
    g = weight_g_idx if has_gidx else weight_packed
    b = bias if bias is not None else weight_scale
    group = -1 if group_size == -1 or group_size >= in_features else group_size
    common = dict(
        BITS=bits,
        GROUP_SIZE=group,
        HAS_ZP=has_zp,
        HAS_GIDX=has_gidx,
        HAS_BIAS=bias is not None,
    )
    args = (x2, weight_packed, weight_scale, z, g, b, y)
    strides = (
        x2.stride(0),
        x2.stride(1),
        weight_packed.stride(0),
        weight_scale.stride(0),
        z.stride(0) if has_zp else 0,
        y.stride(0),
    )
    use_gemv = m <= GEMV_MAX_M if mode == "auto" else mode == "gemv"
    if use_gemv:
        if m > GEMV_MAX_M:
            raise ValueError(f"the GEMV kernel takes at most {GEMV_MAX_M} rows, got {m}")
        block_m = triton.next_power_of_2(m)

        def gemv_grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        _gemv_kernel[gemv_grid](*args, m, n, k, *strides, BLOCK_M=block_m, **common)
    else:

        def gemm_grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _gemm_kernel[gemm_grid](
            *args,
            m,
            n,
            k,
            _m_bucket(m),
            *strides,
            IEEE=x.dtype == torch.float32,
            UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
            **common,
        )
    return y.reshape(*lead, n)
