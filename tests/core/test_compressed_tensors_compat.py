"""Our storage contract against the installed compressed-tensors package itself.

For every bit width the package packs (it supports 1..8; we use 2, 3, 4, 8), symmetric and asymmetric:
our packed tensors equal what the package's compressor writes from the same weight and stored scale,
and the package's decompressor reads our tensors back to our dequantized weight. The qparams we
compute equal the package's ``calculate_qparams`` on the same group min/max.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from compress.core.packing import PackedWeight, pack_codes, pack_weight, pack_zero_point, unpack_codes
from compress.core.primitives import compute_qparams
from compress.core.scheme import QuantScheme

ct = pytest.importorskip("compressed_tensors")


def _import_first(*candidates: tuple[str, str]):
    """The symbol from the first module that has it (functions moved between releases)."""
    for module, name in candidates:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    pytest.skip(f"compressed-tensors {ct.__version__} has none of {candidates}")


pack_to_int32 = _import_first(
    ("compressed_tensors.compressors.pack_quantized.helpers", "pack_to_int32"),
    ("compressed_tensors.compressors.quantized_compressors.pack_quantized", "pack_to_int32"),
)
unpack_from_int32 = _import_first(
    ("compressed_tensors.compressors.pack_quantized.helpers", "unpack_from_int32"),
    ("compressed_tensors.compressors.quantized_compressors.pack_quantized", "unpack_from_int32"),
)
Compressor = _import_first(
    ("compressed_tensors.compressors.pack_quantized", "PackedQuantizationCompressor"),
    ("compressed_tensors.compressors", "PackedQuantizationCompressor"),
)
calculate_qparams = _import_first(("compressed_tensors.quantization.utils", "calculate_qparams"))
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

SCHEMES = [QuantScheme(b, g, sym) for b in (2, 3, 4, 8) for g in (-1, 32) for sym in (True, False)]


def _ct_scheme(scheme: QuantScheme) -> QuantizationScheme:
    args = QuantizationArgs.model_validate(scheme.to_compressed_tensors())
    return QuantizationScheme(targets=["Linear"], weights=args)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_pack_codes_equal_package(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, n), generator=g).to(torch.int8)
    assert torch.equal(pack_codes(q, bits), pack_to_int32(q, bits))
    assert torch.equal(
        pack_zero_point(q.t().to(torch.int32), bits), pack_to_int32(q.t().contiguous(), bits, 0)
    )
    assert torch.equal(unpack_codes(pack_to_int32(q, bits), bits, n), q)
    assert torch.equal(unpack_from_int32(pack_codes(q, bits), bits, torch.Size([5, n])), q)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.tag)
def test_qparams_equal_package(scheme: QuantScheme) -> None:
    torch.manual_seed(0)
    w = torch.randn(9, 64) + 0.3
    gs = scheme.effective_group_size(64)
    grouped = w.reshape(9, -1, gs)
    args = QuantizationArgs.model_validate(scheme.to_compressed_tensors())
    ref_scale, ref_zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    scale, zp = compute_qparams(w, scheme)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(zp, ref_zp.to(torch.int32))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.tag)
def test_checkpoint_tensors_equal_package(scheme: QuantScheme, scale_dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    out_f, in_f = 37, 96  # out is not a multiple of any pack factor: exercises zero-point padding
    w = torch.randn(out_f, in_f) * 0.05 + 0.01
    ours = pack_weight(w, scheme, scale_dtype=scale_dtype)
    _, _, zp = ours.unpack()
    state = {"weight": w, "weight_scale": ours.weight_scale}
    if not scheme.symmetric:
        state["weight_zero_point"] = zp.to(torch.int8)
    theirs = Compressor.compress(state, _ct_scheme(scheme))
    assert torch.equal(theirs["weight_packed"], ours.weight_packed)
    assert torch.equal(theirs["weight_shape"], ours.weight_shape)
    if scheme.symmetric:
        assert "weight_zero_point" not in theirs and ours.weight_zero_point is None
    else:
        assert theirs["weight_zero_point"].shape == (-(-out_f * scheme.bits // 32), scheme.n_groups(in_f))
        assert torch.equal(theirs["weight_zero_point"], ours.weight_zero_point)

    # the package reads our tensors back to our dequantized weight (it computes in the scale dtype)
    tensors = {k.split(".", 1)[1]: v for k, v in ours.tensors("p").items()}
    back = Compressor.decompress(tensors, _ct_scheme(scheme))
    assert back["weight"].dtype == scale_dtype
    assert torch.equal(back["weight"], ours.dequantize(scale_dtype))
    assert torch.equal(
        PackedWeight.from_tensors("p", ours.tensors("p"), scheme).dequantize(), ours.dequantize()
    )


def test_actorder_group_is_gone_from_installed_package() -> None:
    """Record the fact the packing docstring relies on: this release no longer accepts actorder "group"."""
    d = QuantScheme(4, 128).to_compressed_tensors(actorder="group")
    try:
        QuantizationArgs.model_validate(d)
    except ValueError:
        return
    # older releases accept it; then it must round-trip as the group strategy
    assert QuantizationArgs.model_validate(d).strategy == "group"
