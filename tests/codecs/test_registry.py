"""The codec registry: every layout's four jobs (encode, decode, config, rebuild), how a checkpoint's layers
are assigned to codecs, and that a new layout is one codec plus one registration."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.codecs import CODECS, StorageCodec, codec, layer_plan, register
from compress.codecs.pack_quantized import PackQuantizedCodec
from compress.core.errors import CompressError
from compress.core.qargs import QuantArgs
from compress.core.scheme import QuantScheme
from compress.kernels.quant_linear import QuantLinear

FP8 = QuantScheme(weights=QuantArgs(num_bits=8, type="float", strategy="channel"))
QUANTIZED = {"pack-quantized": QuantScheme(4, 32, False), "naive-quantized": QuantScheme(8, 32),
             "int-quantized": QuantScheme(8, -1), "float-quantized": FP8, "gptq": QuantScheme(4, 32)}


def _weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(32, 64)


def test_the_layouts_are_registered() -> None:
    assert set(CODECS.names()) >= {*QUANTIZED, "sparse-bitmask"}
    with pytest.raises(CompressError, match="unknown codec 'marlin-24'; known: "):
        codec("marlin-24")


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_encode_decode_rebuild_agree(name: str) -> None:
    layout, scheme, w = codec(name), QUANTIZED[name], _weight()
    parts = layout.encode(w, scheme)
    assert set(parts) <= set(layout.leaves) | {"weight_shape"} and layout.marker in parts
    tensors = {f"m.{leaf}": t for leaf, t in parts.items()}
    dense = layout.decode("m", tensors, scheme, **({"checkpoint_format": "gptq"} if name == "gptq" else {}))
    assert (dense - w).abs().max() < 0.6  # a quantized copy of w
    bias = torch.randn(32)
    module = layout.rebuild("m", {**tensors, "m.bias": bias}, scheme, bias,
                            **({"checkpoint_format": "gptq"} if name == "gptq" else {}))
    assert isinstance(module, QuantLinear) and torch.equal(module.dequantized_weight(), dense)
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(module(x), F.linear(x, dense.double(), bias.double()))
    group = layout.config(scheme)
    if name == "gptq":
        assert (group["bits"], group["group_size"], group["sym"]) == (4, 32, True)
    else:
        assert QuantScheme.from_config_group({"targets": ["Linear"], **group}) == scheme


def test_sparse_bitmask_round_trip_is_exact_and_rebuilds_a_linear() -> None:
    layout = codec("sparse-bitmask")
    w = _weight() * (torch.rand(32, 64, generator=torch.Generator().manual_seed(1)) > 0.5)
    tensors = {f"m.{leaf}": t for leaf, t in layout.encode(w).items()}
    assert torch.equal(layout.decode("m", tensors), w)
    module = layout.rebuild("m", tensors, None, None)
    assert type(module) is nn.Linear and torch.equal(module.weight, w)
    assert layout.config(targets=["re:^m$"], global_sparsity=0.5, structure="unstructured")["format"] == layout.name
    with pytest.raises(CompressError, match="cannot be served as sparse-bitmask"):
        layout.encode(w, QuantScheme(4, 32))


def test_layer_plan_assigns_each_layer_its_codec() -> None:
    names = {"a.weight_packed", "a.weight_scale", "a.weight_shape", "b.weight", "b.weight_scale",
             "c.shape", "c.compressed", "c.bitmask", "c.row_offsets", "d.weight", "norm.weight"}
    quant = {"quant_method": "compressed-tensors", "format": "mixed-precision", "config_groups": {
        "group_0": {"targets": ["re:^a$"], "format": "pack-quantized", **codec("pack-quantized").config(QuantScheme(4, 32))},
        "group_1": {"targets": ["re:^b$"], "format": "float-quantized", **codec("float-quantized").config(FP8)},
    }, "sparsity_config": {"format": "sparse-bitmask"}}
    plan = {layer.name: (layer.codec.name, layer.scheme) for layer in layer_plan(names, quant)}
    assert plan == {"a": ("pack-quantized", QuantScheme(4, 32)), "b": ("float-quantized", FP8),
                    "c": ("sparse-bitmask", None)}
    with pytest.raises(CompressError, match="folder x holds packed weights but config.json has no"):
        layer_plan(names, None, source="folder x")
    untargeted = {**quant, "config_groups": {"group_0": quant["config_groups"]["group_0"]}}
    with pytest.raises(CompressError, match="layer b has packed weights but no config group targets it"):
        layer_plan(names, untargeted)


def test_generic_format_picks_the_codec_that_serves_the_scheme() -> None:
    names = {"b.weight", "b.weight_scale"}
    for scheme, expected in ((FP8, "float-quantized"), (QuantScheme(8, -1), "naive-quantized")):
        quant = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {
            "g": {"targets": ["Linear"], **codec(expected).config(scheme)}}}
        assert [layer.codec.name for layer in layer_plan(names, quant)] == [expected]


class _TransposedPackCodec(PackQuantizedCodec):
    """A toy layout for the registration test: pack-quantized codes under another marker."""

    name: ClassVar[str] = "toy-transposed"  # type: ignore[misc]
    marker = "toy_packed"
    leaves = ("toy_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")

    def claims(self, prefix: str, names: set[str]) -> bool:
        return f"{prefix}.toy_packed" in names


@pytest.fixture
def toy_codec():
    toy = register(_TransposedPackCodec())
    yield toy
    CODECS._items.pop(toy.name)  # the registry is process-wide; leave it as found


def test_a_new_layout_is_one_registration(toy_codec) -> None:
    """Registering is all it takes for configs naming the layout to validate and its layers to be found."""
    names = {"a.toy_packed", "a.weight_scale", "a.weight_shape"}
    quant = {"quant_method": "compressed-tensors", "format": toy_codec.name, "config_groups": {
        "g": {"targets": ["Linear"], **toy_codec.config(QuantScheme(4, 32))}}}
    (layer,) = layer_plan(names, quant)
    assert layer.codec is toy_codec and isinstance(toy_codec, StorageCodec)
