"""QuantScheme: validation messages, derived sizes, and the compressed-tensors dict round trip."""

from __future__ import annotations

import pytest

from compress.core.errors import CompressError
from compress.core.scheme import QuantArgs, QuantScheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 48, 128])
def test_valid_schemes_pass(bits: int, group_size: int) -> None:
    QuantScheme(bits, group_size).validate()


@pytest.mark.parametrize(
    ("bits", "group_size", "needle"),
    [
        (5, 128, "bit width 5"),
        (1, 128, "bit width 1"),
        (16, 128, "bit width 16"),
        (4, 0, "group size 0"),
        (4, -2, "group size -2"),
        (True, 128, "bit width"),
    ],
)
def test_invalid_schemes_raise_one_sentence(bits: int, group_size: int, needle: str) -> None:
    with pytest.raises(CompressError, match=needle) as exc:
        QuantScheme(bits, group_size).validate()
    assert "\n" not in str(exc.value)


def test_ranges_and_groups() -> None:
    s = QuantScheme(4, 128)
    assert (s.qmin, s.qmax) == (-8, 7)
    assert (QuantScheme(3, 32).qmin, QuantScheme(3, 32).qmax) == (-4, 3)
    assert (QuantScheme(8, -1).qmin, QuantScheme(8, -1).qmax) == (-128, 127)
    assert s.n_groups(256) == 2
    assert s.n_groups(300) == 3  # ceil, as compressed-tensors
    assert QuantScheme(4, -1).n_groups(300) == 1


def test_check_layer_message() -> None:
    QuantScheme(4, 128).check_layer("x", 256)
    QuantScheme(4, -1).check_layer("x", 300)
    with pytest.raises(CompressError) as exc:
        QuantScheme(4, 128).check_layer("model.layers.0.mlp.down_proj", 300)
    assert str(exc.value) == (
        "layer model.layers.0.mlp.down_proj has 300 input features, not divisible by group size 128"
    )


def test_tags() -> None:
    assert QuantScheme(4, 128).tag == "w4g128"
    assert QuantScheme(8, -1).tag == "w8"
    assert QuantScheme(4, 128, symmetric=False).tag == "w4g128a"
    assert QuantScheme(3, 48).tag == "w3g48"


def test_to_compressed_tensors_matches_formats_md() -> None:
    assert QuantScheme(4, 128).to_compressed_tensors() == {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": 128,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
        "block_structure": None,
    }
    d = QuantScheme(8, -1, symmetric=False).to_compressed_tensors(actorder="group")
    assert (d["strategy"], d["group_size"], d["symmetric"], d["actorder"]) == (
        "channel",
        None,
        False,
        "group",
    )


@pytest.mark.parametrize(
    "scheme", [QuantScheme(4, 128), QuantScheme(8, -1), QuantScheme(3, 48, False), QuantScheme(2, 32, False)]
)
def test_compressed_tensors_round_trip(scheme: QuantScheme) -> None:
    assert QuantScheme.from_compressed_tensors(scheme.to_compressed_tensors()) == scheme


def test_from_compressed_tensors_accepts_minus_one_and_inferred_strategy() -> None:
    assert QuantScheme.from_compressed_tensors({"num_bits": 4, "group_size": -1}) == QuantScheme(4, -1)
    assert QuantScheme.from_compressed_tensors({"num_bits": 4, "group_size": 64}) == QuantScheme(4, 64)


def test_float_weights_parse_as_typed_args() -> None:
    """FP8 weights are a scheme now (whether a layout serves them is the codec's question)."""
    scheme = QuantScheme.from_compressed_tensors({"num_bits": 8, "type": "float", "strategy": "channel"})
    assert scheme.weights == QuantArgs(num_bits=8, type="float", strategy="channel")
    assert (scheme.tag, scheme.is_int) == ("wfp8", False)


@pytest.mark.parametrize(
    ("d", "needle"),
    [
        ({"num_bits": 4, "type": "float", "strategy": "channel"}, "float bit width 4"),
        ({"num_bits": 5, "strategy": "group", "group_size": 128}, "bit width 5"),
        ({"num_bits": 4, "strategy": "group", "group_size": None}, "positive group size"),
        ({"num_bits": 4, "strategy": "attn_head"}, "strategy"),
        ({"num_bits": 4, "strategy": "channel", "group_size": 128}, "channel"),
        ({"num_bits": 4, "strategy": "group", "group_size": 128, "dynamic": True}, "dynamic"),
        ({"num_bits": 4, "strategy": "block", "block_structure": [128, 128]}, "block"),
        ({"num_bits": 8, "strategy": "token"}, "dynamic"),
        ({"num_bits": 8, "type": "nf4"}, "type"),
    ],
)
def test_from_compressed_tensors_rejects(d: dict, needle: str) -> None:
    with pytest.raises(CompressError, match=needle) as exc:
        QuantScheme.from_compressed_tensors(d)
    assert "\n" not in str(exc.value)


def test_per_tensor_int_has_no_group_size() -> None:
    """The integer group math must not mistake per-tensor scales for per-channel ones."""
    scheme = QuantScheme.from_compressed_tensors({"num_bits": 4, "strategy": "tensor"})
    with pytest.raises(CompressError, match="strategy tensor has no group size"):
        _ = scheme.group_size
