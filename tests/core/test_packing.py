"""The storage contract: bit layout, exact round trips, checkpoint tensor validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress.core.errors import CompressError
from compress.core.packing import (
    PackedWeight,
    pack_codes,
    pack_weight,
    pack_zero_point,
    unpack_codes,
    unpack_zero_point,
)
from compress.core.primitives import compute_qparams, dequantize, quantize
from compress.core.scheme import QuantScheme


def _codes(rows: int, n: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (rows, n), generator=g).to(torch.int8)


def test_int4_word_layout_lsb_first() -> None:
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)  # unsigned 0..15
    packed = pack_codes(q, 4)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert packed[0, 0].item() == 0x76543210
    assert packed[0, 1].item() == 0xFEDCBA98 - (1 << 32)


def test_int8_word_layout() -> None:
    q = torch.tensor([[-128, 127, 0, -1, 5]], dtype=torch.int8)  # unsigned 0, 255, 128, 127, 133
    packed = pack_codes(q, 8)
    assert packed.shape == (1, 2)
    assert packed[0, 0].item() == 0x7F80FF00
    assert packed[0, 1].item() == 133


def test_int3_codes_straddle_words() -> None:
    # dense bit stream: element 10 sits in bits 30-31 of word 0 and bit 0 of word 1
    q = torch.full((1, 32), -4, dtype=torch.int8)  # unsigned 0
    q[0, 10] = 3  # unsigned 7 = 0b111
    packed = pack_codes(q, 3)
    assert packed.shape == (1, 3)
    assert packed[0].tolist() == [0xC0000000 - (1 << 32), 1, 0]
    assert torch.equal(unpack_codes(packed, 3, 32), q)


def test_zero_point_packed_along_output_dim() -> None:
    zp = _codes(9, 3, 4)
    packed = pack_zero_point(zp.to(torch.int32), 4)
    assert packed.shape == (math.ceil(9 * 4 / 32), 3)
    assert torch.equal(packed[:, 1:2], pack_codes(zp[:, 1:2].t(), 4).t())
    assert torch.equal(unpack_zero_point(packed, 4, 9), zp.to(torch.int32))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([2, 3, 4, 8]), st.integers(1, 5), st.integers(1, 200), st.integers(0, 999))
def test_pack_unpack_exact(bits: int, rows: int, n: int, seed: int) -> None:
    q = _codes(rows, n, bits, seed)
    packed = pack_codes(q, bits)
    assert packed.shape == (rows, math.ceil(n * bits / 32)) and packed.dtype == torch.int32
    assert torch.equal(unpack_codes(packed, bits, n), q)


def test_pack_rejects_out_of_range_and_unpack_wrong_width() -> None:
    with pytest.raises(CompressError, match="range"):
        pack_codes(torch.tensor([[8]], dtype=torch.int8), 4)
    with pytest.raises(CompressError, match="packed words"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 4, 8)


SCHEMES = [QuantScheme(4, 32), QuantScheme(3, 48, False), QuantScheme(8, -1), QuantScheme(2, 32, False)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.tag)
def test_packed_weight_round_trip(scheme: QuantScheme) -> None:
    torch.manual_seed(0)
    w = torch.randn(11, 96)
    pw = pack_weight(w, scheme, scale_dtype=torch.float16)
    t = pw.tensors("model.layers.0.mlp.up_proj")
    expected = {"weight_packed", "weight_scale", "weight_shape"} | (
        set() if scheme.symmetric else {"weight_zero_point"}
    )
    assert set(t) == {f"model.layers.0.mlp.up_proj.{n}" for n in expected}
    assert t["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.float16
    assert t["model.layers.0.mlp.up_proj.weight_shape"].tolist() == [11, 96]
    back = PackedWeight.from_tensors("model.layers.0.mlp.up_proj", t, scheme)
    assert (back.out_features, back.in_features) == (11, 96)
    codes, scale, zp = back.unpack()
    assert codes.shape == (11, 96) and scale.dtype == torch.float32 and zp.dtype == torch.int32
    # codes are those of quantizing with the scale as stored (fp16), not the float32 one
    ref_scale, ref_zp = compute_qparams(w, scheme)
    stored = ref_scale.half().float()
    assert torch.equal(codes, quantize(w, stored, ref_zp, scheme))
    assert torch.equal(back.dequantize(), dequantize(codes, stored, ref_zp, scheme))
    # rounding the scale to fp16 (relative error <= 2^-11) can push the extreme code past qmax by that much
    step = stored.repeat_interleave(scheme.effective_group_size(96), dim=1)
    slack = 0.5 + (scheme.qmax + 1) * 2.0**-11
    assert bool(((w - back.dequantize()).abs() <= step * slack + 1e-6).all())


def test_from_tensors_errors_name_the_tensor() -> None:
    s = QuantScheme(4, 32, symmetric=False)
    t = pack_weight(torch.randn(8, 64), s).tensors("L")
    bad = dict(t, **{"L.weight_scale": torch.ones(8, 3, dtype=torch.float16)})
    with pytest.raises(CompressError, match=r"tensor L\.weight_scale has shape \(8, 3\), expected \(8, 2\)"):
        PackedWeight.from_tensors("L", bad, s)
    bad = dict(t, **{"L.weight_packed": t["L.weight_packed"].to(torch.int64)})
    with pytest.raises(CompressError, match=r"L\.weight_packed has dtype"):
        PackedWeight.from_tensors("L", bad, s)
    missing = {k: v for k, v in t.items() if not k.endswith("zero_point")}
    with pytest.raises(CompressError, match=r"L\.weight_zero_point is missing"):
        PackedWeight.from_tensors("L", missing, s)
    with pytest.raises(CompressError, match=r"L\.weight_packed has shape"):
        PackedWeight.from_tensors("L", t, QuantScheme(8, 32, symmetric=False))


def test_g_idx_stored_and_used() -> None:
    torch.manual_seed(1)
    s = QuantScheme(4, 16)
    w = torch.randn(6, 64)
    g_idx = (torch.argsort(torch.randperm(64)) // 16).to(torch.int32)
    pw = pack_weight(w, s, g_idx=g_idx)
    t = pw.tensors("L")
    assert t["L.weight_g_idx"].dtype == torch.int32 and torch.equal(t["L.weight_g_idx"], g_idx)
    back = PackedWeight.from_tensors("L", t, s)
    scale, zp = compute_qparams(w, s, g_idx=g_idx)
    stored = scale.half().float()
    assert torch.equal(back.dequantize(), dequantize(quantize(w, stored, zp, s, g_idx), stored, zp, s, g_idx))
    bad = dict(t, **{"L.weight_g_idx": torch.full((64,), 4, dtype=torch.int32)})
    with pytest.raises(CompressError, match="weight_g_idx holds group ids"):
        PackedWeight.from_tensors("L", bad, s)


def test_pack_weight_with_given_qparams_and_underflow_guard() -> None:
    s = QuantScheme(8, -1)
    w = torch.tensor([[1e-9, -1e-9], [1.0, -2.0]])
    pw = pack_weight(w, s, scale_dtype=torch.float16)
    assert bool((pw.weight_scale > 0).all())
    assert torch.isfinite(pw.dequantize()).all()
    given = torch.tensor([[1.0], [1.0]])
    pw = pack_weight(w, s, scale=given, scale_dtype=torch.float32)
    assert pw.unpack()[0].tolist() == [[0, 0], [1, -2]]
    with pytest.raises(CompressError, match="zero point"):
        pack_weight(w, QuantScheme(8, -1, symmetric=False), scale=given)
