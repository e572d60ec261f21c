"""The cpu path against the float64 reference, and proofs of the int4pack layout / zero-point mapping.

The cpu kernels compute with bfloat16 activations, scales and zeros (see ``compress.kernels.cpu``), so
random-data comparisons use a relative Frobenius error bound of 1e-2 against the float64 reference
(bf16 has an 8-bit mantissa: ~4e-3 per rounding). The mapping itself is proven *bit-exactly* with
weights chosen to be representable in bf16 and an identity matrix as input.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.core.packing import PackedWeight, pack_codes, pack_zero_point
from compress.core.scheme import QuantScheme
from compress.kernels.cpu import CPU
from compress.kernels.paths import REFERENCE
from compress.kernels.quant_linear import QuantLinear

BF16_RTOL = 1e-2


def _layer(out_f: int, in_f: int, scheme: QuantScheme, *, bias: bool = True, g_idx=None, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    return QuantLinear.from_linear(lin, scheme, g_idx=g_idx)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def _check(layer: QuantLinear, batch: tuple[int, ...] = (3,)) -> None:
    assert CPU.unsupported(layer) is None
    CPU.prepare(layer)
    x = torch.randn(*batch, layer.in_features, dtype=torch.float64)
    ref = REFERENCE.forward(layer, x)  # float64 dequantize + matmul
    y = CPU.forward(layer, x)
    assert y.dtype == torch.float64 and y.shape == ref.shape
    assert _rel_err(y, ref) < BF16_RTOL


# shapes: out not a multiple of 16 (padded) or of the 64-row block; in not a power of two; several M
SHAPES = [(200, 256, (1,)), (48, 384, (2, 5)), (13, 512, (17,)), (96, 1024, (128,))]


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_int4_matches_reference(group: int, symmetric: bool, shape) -> None:
    out_f, in_f, batch = shape
    _check(_layer(out_f, in_f, QuantScheme(4, group, symmetric), bias=symmetric), batch)


@pytest.mark.parametrize("shape", [(13, 96, (1,)), (200, 256, (4, 3)), (64, 1040, (33,))], ids=str)
def test_int8_per_channel_matches_reference(shape) -> None:
    out_f, in_f, batch = shape
    _check(_layer(out_f, in_f, QuantScheme(8, -1)), batch)


@pytest.mark.parametrize("group", [512, 1024])
def test_int4_large_groups_repeat_scales(group: int) -> None:
    _check(_layer(40, 1024, QuantScheme(4, group, False)), (5,))


def test_act_order_permutation() -> None:
    """GPTQ-style act-order (each group = exactly group_size columns, scattered) via column permutation."""
    in_f, gs = 256, 64
    torch.manual_seed(1)
    g_idx = (torch.arange(in_f) // gs)[torch.randperm(in_f)].to(torch.int32)
    layer = _layer(48, in_f, QuantScheme(4, gs, False), g_idx=g_idx)
    _check(layer, (7,))
    assert layer._cpu_perm is not None
    trivial = _layer(48, in_f, QuantScheme(4, gs), g_idx=(torch.arange(in_f) // gs).to(torch.int32))
    _check(trivial)
    assert trivial._cpu_perm is None


def _exact_layer(out_f: int, in_f: int, scheme: QuantScheme, g_idx=None) -> QuantLinear:
    """Random codes / zero points and power-of-two scales: every dequantized weight is exact in bf16."""
    torch.manual_seed(2)
    n_groups = scheme.n_groups(in_f)
    codes = torch.randint(scheme.qmin, scheme.qmax + 1, (out_f, in_f), dtype=torch.int8)
    scale = 2.0 ** torch.randint(-8, 0, (out_f, n_groups)).float()
    zp = torch.randint(scheme.qmin, scheme.qmax + 1, (out_f, n_groups), dtype=torch.int32)
    packed = PackedWeight(
        weight_packed=pack_codes(codes, scheme.bits),
        weight_scale=scale,
        weight_zero_point=None if scheme.symmetric else pack_zero_point(zp, scheme.bits),
        weight_g_idx=g_idx,
        weight_shape=torch.tensor([out_f, in_f]),
        scheme=scheme,
    )
    return QuantLinear.from_packed(packed, None)


@pytest.mark.parametrize(
    "scheme", [QuantScheme(4, 32), QuantScheme(4, 128, False), QuantScheme(4, -1, False), QuantScheme(8, -1)],
    ids=lambda s: s.tag,
)
def test_mapping_is_bit_exact(scheme: QuantScheme) -> None:
    """Kernel(I) is the kernel's own dequantized weight: it equals ours exactly, so u = q + 8 (the stored
    nibble), scale = s, zero = -zp * s, and the group/row layout are right, not just close."""
    layer = _exact_layer(80, 256, scheme)
    CPU.prepare(layer)
    eye = torch.eye(256, dtype=torch.bfloat16)
    kernel_w = CPU.forward(layer, eye).t()  # [out, in]
    assert torch.equal(kernel_w.double(), layer.dequantized_weight(torch.float64))


def test_mapping_is_bit_exact_with_act_order() -> None:
    in_f, gs = 256, 32
    torch.manual_seed(3)
    g_idx = (torch.arange(in_f) // gs)[torch.randperm(in_f)].to(torch.int32)
    layer = _exact_layer(32, in_f, QuantScheme(4, gs, False), g_idx=g_idx)
    CPU.prepare(layer)
    kernel_w = CPU.forward(layer, torch.eye(in_f, dtype=torch.bfloat16)).t()
    assert torch.equal(kernel_w.double(), layer.dequantized_weight(torch.float64))


def test_convert_takes_unpacked_unsigned_codes() -> None:
    """What we rely on from ``_convert_weight_to_int4pack_for_cpu``: it takes int32 ``[N, K]`` codes 0..15
    (unpacked, unsigned) and the matmul reads them back as ``(q - 8)·scale + zero``. The packed bytes' own
    order is the op's business and differs by CPU (AVX-512 and AVX2 builds block differently), so it is
    checked through the matmul, not byte by byte."""
    u = torch.randint(0, 16, (64, 64), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    assert packed.dtype == torch.uint8 and packed.numel() == u.numel() // 2
    group = 32
    scale_and_zero = torch.stack([torch.ones(64 // group, 64), torch.full((64 // group, 64), 8.0)], dim=-1)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(64, dtype=torch.bfloat16), packed, group,
                                                   scale_and_zero.to(torch.bfloat16))
    assert torch.equal(y.t().int(), u)  # w = (q - 8)·1 + 8 = q, read through an identity


def test_state_dict_unchanged_and_buffers_non_persistent() -> None:
    layer = _layer(48, 128, QuantScheme(4, 32, False))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    CPU.prepare(layer)
    after = layer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_half_precision_inputs_keep_their_dtype() -> None:
    layer = _layer(64, 128, QuantScheme(4, 64))
    CPU.prepare(layer)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(2, 128, dtype=dtype)
        y = CPU.forward(layer, x)
        assert y.dtype == dtype
        assert _rel_err(y, REFERENCE.forward(layer, x.double())) < 2 * BF16_RTOL


@pytest.mark.parametrize(
    ("scheme", "in_f", "g_idx", "needle"),
    [
        (QuantScheme(3, 32), 128, None, "3-bit"),
        (QuantScheme(2, 32), 128, None, "2-bit"),
        (QuantScheme(4, 16), 128, None, "group size 16"),
        (QuantScheme(4, 48), 96, None, "group size 48"),
        (QuantScheme(4, -1), 80, None, "group size 80"),
        (QuantScheme(8, -1, False), 128, None, "asymmetric"),
        (QuantScheme(8, 32), 128, None, "one scale per output channel"),
        (QuantScheme(8, -1), 40, None, "divisible by 16"),
        (QuantScheme(4, 32), 128, torch.tensor([0] * 40 + [1] * 24 + [2] * 32 + [3] * 32, dtype=torch.int32),
         "exactly 32 columns"),
    ],
    ids=["w3", "w2", "g16", "g48", "perchannel-80", "w8-asym", "w8-group", "w8-k40", "act-order-unbalanced"],
)
def test_refuses_what_it_cannot_do_exactly(scheme: QuantScheme, in_f: int, g_idx, needle: str) -> None:
    layer = QuantLinear(in_f, 32, scheme, bias=False, has_g_idx=g_idx is not None)
    if g_idx is not None:
        layer.weight_g_idx.copy_(g_idx)
    reason = CPU.unsupported(layer)
    assert reason is not None and needle in reason


def test_refuses_non_cpu_devices() -> None:
    layer = QuantLinear(128, 32, QuantScheme(4, 32), bias=False, device="meta")
    reason = CPU.unsupported(layer)
    assert reason is not None and "meta" in reason
