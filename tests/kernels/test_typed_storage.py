"""The forward receives the layer's typed storage: no scheme is rebuilt per call, every layout has a reference
forward, and kernel paths are chosen per (codec, device)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress.core.scheme as scheme_module
from compress.codecs import quantize_linear
from compress.core.packing import PackedWeight
from compress.core.qargs import QuantArgs
from compress.core.scheme import QuantScheme
from compress.core.unpacked import UnpackedWeight
from compress.kernels.cpu import CPU
from compress.kernels.ops import dequant_matmul
from compress.kernels.paths import DENSE, REFERENCE, apply_kernel
from compress.kernels.quant_linear import QuantLinear

FP8 = QuantScheme(weights=QuantArgs(num_bits=8, type="float", strategy="channel"))


def _layers() -> dict[str, QuantLinear]:
    torch.manual_seed(0)
    return {
        "pack": QuantLinear.from_linear(nn.Linear(128, 32), QuantScheme(4, 32, False)),
        "int8": quantize_linear(nn.Linear(128, 32), QuantScheme(8, -1), format="int-quantized"),
        "fp8": quantize_linear(nn.Linear(128, 32), FP8, format="float-quantized"),
    }


@pytest.mark.parametrize("kind", ["pack", "int8", "fp8"])
def test_storage_is_the_buffers_with_the_layers_scheme(kind: str) -> None:
    layer = _layers()[kind]
    storage = layer.storage()
    assert isinstance(storage, PackedWeight if kind == "pack" else UnpackedWeight)
    assert storage.scheme is layer.scheme  # carried, not re-derived
    for name, tensor in storage.named_tensors().items():
        assert tensor is getattr(layer, name)
    assert set(layer.state_dict()) == {f for f in storage.named_tensors() if f in storage.PERSISTENT} | {"bias"}


@pytest.mark.parametrize("kind", ["pack", "int8", "fp8"])
def test_typed_entry_matches_the_dequantized_weight(kind: str) -> None:
    layer = _layers()[kind]
    x = torch.randn(5, 128, dtype=torch.float64)
    expected = F.linear(x, layer.dequantized_weight(torch.float64), layer.bias.double())
    torch.testing.assert_close(dequant_matmul(x, layer.storage(), layer.bias), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(REFERENCE.forward(layer, x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["pack", "int8", "fp8"])
def test_no_scheme_is_built_per_forward(kind: str, monkeypatch) -> None:
    layer = _layers()[kind]
    x = torch.randn(2, 128)
    layer(x)  # warm: the low-level op's scalar->scheme cache fills on its first call
    built = []
    original = scheme_module.QuantScheme.__init__

    def counting(self, *args, **kwargs):
        built.append(args)
        original(self, *args, **kwargs)

    monkeypatch.setattr(scheme_module.QuantScheme, "__init__", counting)
    for _ in range(3):
        layer(x)
        REFERENCE.forward(layer, x)
    assert built == []


def test_paths_are_registered_per_codec_and_device() -> None:
    assert CPU.serves("pack-quantized", "cpu") and not CPU.serves("float-quantized", "cpu")
    assert not CPU.serves("pack-quantized", "cuda")
    assert REFERENCE.serves("float-quantized", "cuda") and DENSE.serves("int-quantized", "cpu")
    layers = _layers()
    assert CPU.unsupported(layers["fp8"]) == (
        "the cpu kernels read pack-quantized layers and this one is float-quantized")
    model = nn.ModuleDict(layers)
    counts = apply_kernel(model, "auto")
    assert layers["fp8"].kernel is DENSE and layers["int8"].kernel is DENSE  # only the dense path pays for these
    assert sum(counts.values()) == 3


def test_dtype_casts_keep_fp8_codes() -> None:
    """``.half()`` / ``.to(bfloat16)`` cast activations' dtypes, never the FP8 codes (they are data)."""
    layer = _layers()["fp8"]
    codes = layer.weight.clone()
    half = layer.to(torch.bfloat16)
    assert half.weight.dtype == torch.float8_e4m3fn and torch.equal(half.weight.view(torch.uint8),
                                                                    codes.view(torch.uint8))
    assert half.bias.dtype == torch.bfloat16


def test_fp8_forward_compiles_without_graph_breaks() -> None:
    layer = _layers()["fp8"]
    x = torch.randn(3, 128)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), layer(x))
