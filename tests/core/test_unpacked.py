"""The unpacked layout (naive/int/float-quantized: one int8 or FP8 code per weight) against the installed
compressed-tensors' own naive compressor: what it writes from our stored scale equals our codes, and what it
reads back from our tensors equals our dequantized weight, bit for bit, in the model dtype."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.naive_quantized import (
    FloatQuantizationCompressor,
    IntQuantizationCompressor,
)
from compressed_tensors.quantization import QuantizationScheme

from compress.codecs import codec
from compress.core.errors import CompressError
from compress.core.qargs import QuantArgs
from compress.core.scheme import QuantScheme
from compress.core.unpacked import FP8, UnpackedWeight

INT = {"w8": QuantScheme(8, -1), "w8a": QuantScheme(8, -1, False), "w8g32": QuantScheme(8, 32),
       "w4g32a": QuantScheme(4, 32, False)}
FLOAT = {"fp8": QuantScheme(weights=QuantArgs(num_bits=8, type="float", strategy="channel")),
         "fp8t": QuantScheme(weights=QuantArgs(num_bits=8, type="float", strategy="tensor"))}


def _weight(dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(24, 64) * torch.linspace(0.01, 3, 24)[:, None]
    w[3] = 0  # an all-zero row: eps scale
    return w.to(dtype)


def _theirs(scheme: QuantScheme) -> QuantizationScheme:
    return QuantizationScheme.model_validate(scheme.to_config_group(["Linear"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tag", list(INT) + list(FLOAT))
def test_package_reads_our_codes_and_writes_the_same(tag: str, dtype: torch.dtype) -> None:
    scheme = {**INT, **FLOAT}[tag]
    layout = codec("float-quantized" if tag in FLOAT else "int-quantized")
    compressor = FloatQuantizationCompressor if tag in FLOAT else IntQuantizationCompressor
    w = _weight(dtype)
    ours = layout.encode_storage(w, scheme)
    assert isinstance(ours, UnpackedWeight)
    assert ours.weight.dtype == (FP8 if tag in FLOAT else torch.int8) and ours.weight_scale.dtype == dtype
    local = {k.split(".", 1)[1]: v for k, v in ours.tensors("p").items()}
    dense = compressor.decompress(local, _theirs(scheme))["weight"]
    assert dense.dtype == dtype
    assert torch.equal(dense, ours.dequantize(dtype)), tag
    if dtype != torch.float32:
        return  # their compressor divides in the model dtype, we in float32 (as pack_weight): ties may differ
    # their compressor, given our stored scale (and zero point), writes our codes
    given = {"weight": w, **{k: v for k, v in local.items() if k != "weight"}}
    written = compressor.compress(given, _theirs(scheme))
    assert torch.equal(written["weight"], ours.weight), tag


def test_int8_codes_are_the_packed_codes() -> None:
    """Both integer layouts hold the same codes: moving between them never re-quantizes."""
    w = _weight(torch.float32)
    for scheme in INT.values():
        packed = codec("pack-quantized").encode_storage(w, scheme)
        unpacked = codec("naive-quantized").encode_storage(w, scheme)
        assert torch.equal(packed.unpack()[0], unpacked.weight)
        assert torch.equal(packed.dequantize(), unpacked.dequantize())


def test_fp8_scale_follows_compressed_tensors() -> None:
    """absmax / 448 per channel (their calculate_qparams over the row's min/max), eps for an all-zero row."""
    from compressed_tensors.quantization.utils import calculate_qparams

    w = _weight(torch.float32)
    scheme = FLOAT["fp8"]
    ours = codec("float-quantized").encode_storage(w, scheme)
    scale, _ = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True),
                                 _theirs(scheme).weights)
    assert torch.equal(ours.weight_scale, scale)


@pytest.mark.parametrize(("name", "edit", "needle"), [
    ("weight", lambda t: t.__setitem__("p.weight", t["p.weight"].to(torch.int16)), "p.weight is torch.int16"),
    ("weight_scale", lambda t: t.__setitem__("p.weight_scale", t["p.weight_scale"][:3]), "p.weight_scale is"),
    ("range", lambda t: t.__setitem__("p.weight", torch.full_like(t["p.weight"], 9)), "outside the signed 4-bit"),
    ("missing", lambda t: t.pop("p.weight_zero_point"), "p.weight_zero_point is missing"),
])
def test_bad_unpacked_tensors_are_named(name, edit, needle) -> None:
    scheme = INT["w4g32a"]
    tensors = codec("naive-quantized").encode_storage(_weight(torch.float32), scheme).tensors("p")
    edit(tensors)
    with pytest.raises(CompressError, match=needle):
        UnpackedWeight.from_tensors("p", tensors, scheme)
