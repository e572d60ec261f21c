"""QuantArgs / QuantScheme against compressed-tensors' own QuantizationArgs / QuantizationScheme: field names,
defaults and strategy inference, and exact round trips of the config-group dicts we write."""

from __future__ import annotations

import pytest
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from compress.core.errors import CompressError
from compress.core.qargs import QuantArgs
from compress.core.scheme import QuantScheme

W4G128 = QuantArgs.int_weights(4, 128)
FP8_CHANNEL = QuantArgs(num_bits=8, type="float", strategy="channel")
FP8_TENSOR = QuantArgs(num_bits=8, type="float", strategy="tensor")
A8_TOKEN = QuantArgs(num_bits=8, type="int", strategy="token", dynamic=True)

SCHEMES = {
    "w4g128": QuantScheme(4, 128),
    "w8a-channel": QuantScheme(8, -1, symmetric=False),
    "fp8-channel": QuantScheme(weights=FP8_CHANNEL),
    "fp8-tensor": QuantScheme(weights=FP8_TENSOR),
    "w8a8-dynamic": QuantScheme(weights=QuantArgs.int_weights(8, -1), input_activations=A8_TOKEN),
    "fp8-dynamic": QuantScheme(weights=FP8_CHANNEL, input_activations=QuantArgs(
        num_bits=8, type="float", strategy="token", dynamic=True)),
}


def test_legacy_constructor_means_int_weights() -> None:
    assert QuantScheme(4, 128) == QuantScheme(weights=W4G128)
    assert QuantScheme(bits=8, group_size=-1, symmetric=False).weights == QuantArgs(
        num_bits=8, strategy="channel", symmetric=False)
    assert QuantScheme(4, 128).input_activations is None
    with pytest.raises(TypeError):
        QuantScheme(4, 128, weights=W4G128)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_config_group_round_trip_is_exact(name: str) -> None:
    scheme = SCHEMES[name]
    group = scheme.to_config_group(["Linear"], observer="minmax")
    assert QuantScheme.from_config_group(group) == scheme
    assert QuantScheme.from_config_group(group).to_config_group(["Linear"]) == group  # dict -> scheme -> dict


@pytest.mark.parametrize("name", list(SCHEMES))
def test_compressed_tensors_parses_our_groups_alike(name: str) -> None:
    """The package reads every field we write with the meaning we gave it."""
    group = SCHEMES[name].to_config_group(["Linear"], observer="minmax")
    theirs = QuantizationScheme.model_validate(group)
    for role in ("weights", "input_activations"):
        ours, args = getattr(SCHEMES[name], role), getattr(theirs, role)
        assert (ours is None) == (args is None)
        if ours is not None:
            assert (args.num_bits, args.type, args.strategy, args.symmetric, bool(args.dynamic)) == (
                ours.num_bits, ours.type, ours.strategy, ours.symmetric, ours.dynamic)
            assert args.group_size == (ours.group_size if ours.strategy == "group" else None)


@pytest.mark.parametrize("d", [
    {"num_bits": 4},  # nothing but bits: per tensor
    {"num_bits": 4, "group_size": -1},
    {"num_bits": 4, "group_size": 64},
    {"num_bits": 8, "type": "float"},
    {"num_bits": 8, "strategy": "token", "dynamic": True},
])
def test_inference_of_defaults_follows_compressed_tensors(d: dict) -> None:
    theirs = QuantizationArgs.model_validate(d)
    ours = QuantArgs.from_dict(d)
    assert (ours.num_bits, ours.type, ours.strategy, ours.symmetric, ours.dynamic) == (
        theirs.num_bits, theirs.type, theirs.strategy, theirs.symmetric, bool(theirs.dynamic))


def test_provenance_is_kept_but_does_not_change_meaning() -> None:
    """actorder/observer say how scales were chosen: they round-trip, yet two layers that differ only there
    are one kind of layer (one config group)."""
    d = W4G128.to_dict() | {"actorder": "static", "observer": "mse"}
    args = QuantArgs.from_dict(d)
    assert (args.actorder, args.observer) == ("weight", "mse")  # compressed-tensors' alias, normalised
    assert args == W4G128 and hash(args) == hash(W4G128)
    assert args.to_dict()["actorder"] == "weight" and args.to_dict()["observer"] == "mse"


@pytest.mark.parametrize(("group", "needle"), [
    ({"weights": None, "input_activations": None}, "needs weights or input_activations"),
    ({"weights": W4G128.to_dict(), "output_activations": A8_TOKEN.to_dict()}, "output activation"),
    ({"weights": W4G128.to_dict(), "input_activations": {**A8_TOKEN.to_dict(), "actorder": "weight"}},
     "activation ordering applies to weights"),
    ({"weights": {**W4G128.to_dict(), "dynamic": "local"}}, "dynamic 'local'"),
    ({"weights": {**FP8_CHANNEL.to_dict(), "strategy": "token", "dynamic": True}}, "dynamic weight"),
    ("group_0", "must be a mapping"),
])
def test_unrepresentable_groups_are_one_sentence(group, needle: str) -> None:
    with pytest.raises(CompressError, match=needle) as caught:
        QuantScheme.from_config_group(group)
    assert "\n" not in str(caught.value)


def test_tags_name_every_form() -> None:
    assert [SCHEMES[n].tag for n in SCHEMES] == ["w4g128", "w8a", "wfp8", "wfp8t", "w8a8d", "wfp8afp8d"]
