"""The CPU fast path: repack at load into the layouts of torch's own int4 / int8 weight-only kernels.

Why these kernels: ``aten._weight_int4pack_mm_for_cpu`` and ``aten._weight_int8pack_mm`` ship with torch
(no extra dependency), read the weight in its quantized form (0.5 / 1 byte per weight instead of 4), and
are vectorised for AVX2/AVX-512. We repack once in ``prepare`` and keep the result as non-persistent
buffers, so ``state_dict()`` is still exactly the compressed-tensors checkpoint.

The 4-bit layout (verified on torch 2.13 by ``tests/kernels/test_cpu_path.py``):

- ``_convert_weight_to_int4pack_for_cpu(u, 1)`` takes *unpacked* unsigned codes ``u`` (int32
  ``[N, K]``, values 0..15, N % 16 == 0, K even) and returns an opaque uint8 ``[N, K/2]`` blocked
  layout (within a 64-row block, byte ``j`` of column ``k`` holds row ``j`` low / row ``j+32`` high);
  we never touch that layout ourselves;
- ``_weight_int4pack_mm_for_cpu(x, packed, G, sz)`` needs ``K % G == 0``, ``G`` in {32, 64, 128, 256},
  ``sz`` of shape ``[K/G, N, 2]`` in ``x.dtype`` holding (scale, zero), and computes with
  ``w[n, k] = (u[n, k] - 8) * sz[k // G, n, 0] + sz[k // G, n, 1]`` (the "tinygemm" convention:
  zero = min + 8 * scale when quantizing from a float range).

Our checkpoint stores signed codes ``q = u - 8`` (compressed-tensors stores ``q + 8``, the same
nibble) and integer zero points ``zp``: ``w = (q - zp) * s = (u - 8) * s + (-zp * s)``. So the kernel
gets our unsigned nibble unchanged, scale ``s`` and zero ``-zp * s`` (0 when symmetric). Per-channel
and group sizes that are multiples of a supported ``G`` repeat the scale over several kernel groups;
activation ordering whose groups each hold exactly ``group_size`` columns is served by sorting the
weight's columns by group and gathering ``x``'s columns the same way (a reordering of the sum only).

Precision: the fp32 and fp16 variants of both kernels run unvectorised on torch 2.13 (about 10x slower
than dense fp32 on a GEMV, measured), so this path always computes with **bfloat16 activations,
bfloat16 scales and zeros** (fp32 accumulation inside the kernel) and casts the result back to
``x.dtype``. Expect ~1e-3..1e-2 relative error against a float64 reference, the same as running the
dequantized model in bf16; use ``kernel="reference"`` when exact fp32/fp64 arithmetic matters.

8-bit: ``_weight_int8pack_mm(x, q, s)`` computes ``x @ (q * s[:, None]).T`` with one scale per
output row, so it serves only symmetric per-channel int8 (with ``K % 16 == 0``: other K read out of
bounds or return NaN on torch 2.13). Everything else is refused with a reason and auto falls back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from compress.kernels.paths import KernelPath, register_path

if TYPE_CHECKING:
    from compress.kernels.quant_linear import QuantLinear

INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts, largest first
COMPUTE_DTYPE = torch.bfloat16
_N_ALIGN = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0; we pad rows and slice the output
_INT8_K_ALIGN = 16


def _kernel_group(group: int) -> int | None:
    """The largest kernel group size dividing ``group`` (scales repeat over ``group / G`` kernel groups)."""
    return next((g for g in INT4_GROUPS if group % g == 0), None)


def _act_order_perm(layer: QuantLinear) -> tuple[Tensor | None, str | None]:
    """(column permutation or None, reason it cannot be served or None) for a layer's g_idx."""
    s = layer.scheme
    g_idx = layer.weight_g_idx
    if g_idx is None or s.per_channel:
        return None, None  # per-channel: one group, g_idx cannot change anything
    gs = s.group_size
    n_groups = s.n_groups(layer.in_features)
    idx = g_idx.to(torch.long)
    counts = torch.bincount(idx, minlength=n_groups)
    if counts.numel() != n_groups or bool((counts != gs).any()) or n_groups * gs != layer.in_features:
        return None, (f"its act-order g_idx does not give every group exactly {gs} columns, so no column "
                      "permutation maps it onto the kernel's contiguous groups")
    perm = torch.argsort(idx, stable=True)
    if torch.equal(perm, torch.arange(layer.in_features, device=perm.device)):
        return None, None
    return perm, None


class CpuPath(KernelPath):
    """int4 via ``_weight_int4pack_mm_for_cpu``, symmetric per-channel int8 via ``_weight_int8pack_mm``."""

    name = "cpu"
    formats = ("pack-quantized",)
    devices = ("cpu",)

    def check(self, layer: QuantLinear) -> str | None:
        s = layer.scheme
        device = layer.weight_packed.device
        if device.type != "cpu":
            return f"the cpu kernels run on CPU tensors and the layer is on {device}"
        k = layer.in_features
        if s.bits == 4:
            group = s.effective_group_size(k)
            g = _kernel_group(group)
            if g is None:
                return (f"group size {group} is not a multiple of a group size the int4 kernel supports "
                        f"({', '.join(map(str, INT4_GROUPS))})")
            if k % g != 0:
                return f"in_features {k} is not a whole number of {g}-column kernel groups"
            return _act_order_perm(layer)[1]
        if s.bits == 8:
            if not s.symmetric:
                return "the int8 kernel has no zero points (asymmetric int8 is not supported)"
            if s.n_groups(k) != 1:
                return f"the int8 kernel takes one scale per output channel, not groups of {s.group_size}"
            if k % _INT8_K_ALIGN != 0:
                return f"the int8 kernel needs in_features divisible by {_INT8_K_ALIGN}, got {k}"
            return None
        return f"there is no CPU kernel for {s.bits}-bit weights"

    def prepare(self, layer: QuantLinear) -> None:
        codes, scale, zp = layer.packed().unpack()  # the typed storage: signed int8 [N, K], fp32 / int32 [N, G]
        if layer.scheme.bits == 8:
            layer.register_buffer("_cpu_w8", codes.contiguous(), persistent=False)
            layer.register_buffer("_cpu_s8", scale[:, 0].to(COMPUTE_DTYPE).contiguous(), persistent=False)
            return
        self._prepare_int4(layer, codes, scale, zp)

    @staticmethod
    def _prepare_int4(layer: QuantLinear, codes: Tensor, scale: Tensor, zp: Tensor) -> None:
        s = layer.scheme
        n, k = layer.out_features, layer.in_features
        group = s.effective_group_size(k)
        g = _kernel_group(group)
        assert g is not None  # unsupported() said so
        perm, _ = _act_order_perm(layer)
        if perm is not None:
            codes = codes.index_select(1, perm)  # column j now belongs to group j // group_size
        zero = -zp.float() * scale  # w = (u - 8) * s + zero with u = q + 8
        reps = group // g
        scale_k = scale.repeat_interleave(reps, dim=1)[:, : k // g]
        zero_k = zero.repeat_interleave(reps, dim=1)[:, : k // g]
        pad = -n % _N_ALIGN
        u = codes.to(torch.int32) + 8
        if pad:  # padded rows (code 8, scale 0) give zeros, sliced off in forward
            u = torch.nn.functional.pad(u, (0, 0, 0, pad), value=8)
            scale_k = torch.nn.functional.pad(scale_k, (0, 0, 0, pad))
            zero_k = torch.nn.functional.pad(zero_k, (0, 0, 0, pad))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
        sz = torch.stack([scale_k.t(), zero_k.t()], dim=-1).to(COMPUTE_DTYPE).contiguous()
        layer.register_buffer("_cpu_w4", packed, persistent=False)
        layer.register_buffer("_cpu_sz", sz, persistent=False)
        layer.register_buffer("_cpu_perm", perm, persistent=False)
        layer._cpu_group = g

    def forward(self, layer: QuantLinear, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, layer.in_features)
        if layer.scheme.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(COMPUTE_DTYPE).contiguous(), layer._cpu_w8, layer._cpu_s8)
        else:
            if layer._cpu_perm is not None:
                x2 = x2.index_select(1, layer._cpu_perm)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(COMPUTE_DTYPE).contiguous(), layer._cpu_w4, layer._cpu_group, layer._cpu_sz
            )
            if y.shape[1] != layer.out_features:
                y = y[:, : layer.out_features]
        y = y.to(x.dtype)
        if layer.bias is not None:
            y = y + layer.bias.to(x.dtype)
        return y.reshape(*lead, layer.out_features)


CPU = register_path(CpuPath(), auto_priority=100)  # after any accelerator path; it refuses non-CPU layers
