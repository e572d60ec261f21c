"""qparams / quantize / dequantize: hand-computed examples and error bounds under hypothesis."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress.core.errors import CompressError
from compress.core.primitives import compute_qparams, dequantize, fake_quantize, quantize
from compress.core.scheme import QuantScheme


def test_symmetric_hand_example() -> None:
    s = QuantScheme(4, -1)
    w = torch.tensor([[1.5, -0.75, 0.0, 0.3]])
    scale, zp = compute_qparams(w, s)
    # absmax / ((2^4 - 1) / 2) = 1.5 / 7.5, as compressed-tensors computes it
    assert torch.allclose(scale, torch.tensor([[0.2]]))
    assert zp.dtype == torch.int32 and zp.tolist() == [[0]]
    q = quantize(w, scale, zp, s)
    assert q.dtype == torch.int8
    assert q.tolist() == [[7, -4, 0, 2]]  # 7.5 clamps to 7, -3.75 -> -4, 1.5 -> 2 (half to even)
    assert torch.allclose(dequantize(q, scale, zp, s), torch.tensor([[1.4, -0.8, 0.0, 0.4]]))


def test_asymmetric_hand_example() -> None:
    s = QuantScheme(4, 2, symmetric=False)
    w = torch.tensor([[-1.0, 2.0, 1.2, 3.0]])
    scale, zp = compute_qparams(w, s)
    # group 0: min -1, max 2 -> scale 3/15, zp = -8 - (-1/0.2) = -3
    # group 1: min widened to 0, max 3 -> scale 3/15, zp = -8
    assert torch.allclose(scale, torch.tensor([[0.2, 0.2]]))
    assert zp.tolist() == [[-3, -8]]
    q = quantize(w, scale, zp, s)
    assert q.tolist() == [[-8, 7, -2, 7]]
    assert torch.allclose(dequantize(q, scale, zp, s), w, atol=1e-6)


def test_positive_only_asym_and_sym_widen_to_zero() -> None:
    w = torch.tensor([[2.0, 3.0]])
    scale, zp = compute_qparams(w, QuantScheme(8, -1, symmetric=False))
    assert torch.allclose(scale, torch.tensor([[3.0 / 255]]))
    assert zp.tolist() == [[-128]]


def test_zero_group_gets_tiny_scale_and_zero_codes() -> None:
    for sym in (True, False):
        s = QuantScheme(4, 2, symmetric=sym)
        w = torch.tensor([[0.0, 0.0, 1.0, -1.0]])
        scale, zp = compute_qparams(w, s)
        assert float(scale[0, 0]) > 0
        assert torch.equal(dequantize(quantize(w, scale, zp, s), scale, zp, s)[:, :2], torch.zeros(1, 2))


def test_clip_ratio_shrinks_scale() -> None:
    w = torch.randn(4, 64)
    s = QuantScheme(4, 32)
    full, _ = compute_qparams(w, s)
    half, _ = compute_qparams(w, s, clip_ratio=0.5)
    assert torch.allclose(half, full * 0.5)
    per_group = torch.tensor([[1.0, 0.5]])
    mixed, _ = compute_qparams(w, s, clip_ratio=per_group)
    assert torch.allclose(mixed, full * per_group)


def test_g_idx_permuted_groups() -> None:
    torch.manual_seed(0)
    s = QuantScheme(4, 16, symmetric=False)
    w = torch.randn(5, 64)
    perm = torch.randperm(64)
    g_idx = (torch.argsort(perm) // 16).to(torch.int32)  # column perm[j] belongs to group j // 16
    scale, zp = compute_qparams(w, s, g_idx=g_idx)
    # the same qparams as quantizing the permuted weight with contiguous groups
    scale_p, zp_p = compute_qparams(w[:, perm], s)
    assert torch.equal(scale, scale_p) and torch.equal(zp, zp_p)
    q = quantize(w, scale, zp, s, g_idx)
    assert torch.equal(q[:, perm], quantize(w[:, perm], scale_p, zp_p, s))
    w_hat = dequantize(q, scale, zp, s, g_idx)
    assert torch.equal(w_hat[:, perm], dequantize(q[:, perm], scale_p, zp_p, s))


def test_bad_g_idx_and_shape() -> None:
    s = QuantScheme(4, 16)
    with pytest.raises(CompressError, match="g_idx"):
        compute_qparams(torch.randn(2, 32), s, g_idx=torch.zeros(31, dtype=torch.int32))
    with pytest.raises(CompressError, match="2-D"):
        compute_qparams(torch.randn(32), s)


def test_fake_quantize_keeps_dtype() -> None:
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    out = fake_quantize(w, QuantScheme(4, 32))
    assert out.dtype == torch.bfloat16 and out.shape == w.shape


@st.composite
def _cases(draw):
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    group_size = draw(st.sampled_from([-1, 32, 64, 128, 48]))
    symmetric = draw(st.booleans())
    out_f = draw(st.integers(1, 9))
    in_f = draw(st.integers(1, 3)) * (group_size if group_size > 0 else draw(st.sampled_from([7, 33, 96])))
    seed = draw(st.integers(0, 2**16))
    spread = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    shift = draw(st.sampled_from([0.0, 0.5]))
    return QuantScheme(bits, group_size, symmetric), out_f, in_f, seed, spread, shift


@settings(max_examples=60, deadline=None)
@given(_cases())
def test_round_trip_error_within_half_step(case) -> None:
    scheme, out_f, in_f, seed, spread, shift = case
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) + shift) * spread
    scale, zp = compute_qparams(w, scheme)
    n_groups = scheme.n_groups(in_f)
    assert scale.shape == (out_f, n_groups) and scale.dtype == torch.float32
    assert zp.shape == (out_f, n_groups) and zp.dtype == torch.int32
    if scheme.symmetric:
        assert not zp.any()
    q = quantize(w, scale, zp, scheme)
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    w_hat = dequantize(q, scale, zp, scheme)
    step = scale.repeat_interleave(scheme.effective_group_size(in_f), dim=1)
    assert bool(((w - w_hat).abs() <= step * (0.5 + 1e-4) + 1e-7).all())
    assert torch.equal(fake_quantize(w, scheme), w_hat)
