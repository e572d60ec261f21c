"""Which path serves each layer (auto, forced by name, COMPRESS_KERNEL), and a whole model on cpu vs reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme
from compress.kernels.paths import AUTO_ORDER, ENV_VAR, apply_kernel, requested_kernel
from compress.kernels.quant_linear import QuantLinear


@pytest.fixture(autouse=True)
def _no_env(monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def _act_order(in_f: int, gs: int, *, balanced: bool) -> torch.Tensor:
    torch.manual_seed(0)
    if balanced:  # what GPTQ writes: groups are consecutive chunks of a column permutation
        return (torch.arange(in_f) // gs)[torch.randperm(in_f)].to(torch.int32)
    return torch.randint(0, in_f // gs, (in_f,), dtype=torch.int32)


def _model() -> nn.Module:
    torch.manual_seed(0)
    lin = lambda: nn.Linear(256, 32)  # noqa: E731
    layers = {
        "sym": QuantLinear.from_linear(lin(), QuantScheme(4, 128)),
        "asym": QuantLinear.from_linear(lin(), QuantScheme(4, 128, False)),
        "w3": QuantLinear.from_linear(lin(), QuantScheme(3, 128)),
        "gptq": QuantLinear.from_linear(lin(), QuantScheme(4, 128, False), g_idx=_act_order(256, 128, balanced=True)),
        "scattered": QuantLinear.from_linear(lin(), QuantScheme(4, 64), g_idx=_act_order(256, 64, balanced=False)),
        "w8": QuantLinear.from_linear(lin(), QuantScheme(8, -1)),
        "w8g": QuantLinear.from_linear(lin(), QuantScheme(8, 128)),
    }
    return nn.ModuleDict(layers)


def test_cpu_registered_for_auto() -> None:
    requested_kernel()
    assert "cpu" in AUTO_ORDER


@pytest.mark.parametrize("packed_pays", [True, False])
def test_auto_never_slower_than_dense(packed_pays, monkeypatch) -> None:
    """auto keeps the cpu path where it is exact and (measured) at least as fast as a dense matmul; every
    other layer, including those only the reference path could serve, runs dense: never slower than the
    dense original. The timing itself is replaced here so the choice is deterministic."""
    import compress.kernels.paths as paths

    monkeypatch.setattr(paths, "_time_against_dense", lambda path, layer: packed_pays)
    model = _model()
    counts = apply_kernel(model, "auto")
    chosen = {name: layer.kernel.name for name, layer in model.items()}
    fast = "cpu" if packed_pays else "dense"
    assert chosen == {"sym": fast, "asym": fast, "w3": "dense", "gptq": fast, "scattered": "dense",
                      "w8": fast, "w8g": "dense"}
    assert counts == ({"cpu": 4, "dense": 3} if packed_pays else {"dense": 7})


def test_dense_path_is_the_reference_exactly_and_timing_leaves_no_buffers() -> None:
    from compress.kernels.paths import _time_against_dense

    model = _model()
    x = torch.randn(3, 256)
    reference = {name: layer(x) for name, layer in model.items()}
    layer = model["sym"]
    before = set(layer._buffers)
    if not _time_against_dense(KERNELS_CPU(), layer):  # a losing packed path leaves nothing behind
        assert set(layer._buffers) == before
    assert layer.kernel is None
    apply_kernel(model, "dense")
    for name, layer in model.items():
        assert torch.equal(layer(x), reference[name]), name
        assert "_dense_weight" not in layer.state_dict()


def KERNELS_CPU():  # noqa: N802
    from compress.kernels.paths import KERNELS

    return KERNELS.get("cpu")


def test_forced_cpu_on_unsupported_layer_names_it() -> None:
    model = _model()
    with pytest.raises(CompressError) as err:
        apply_kernel(model, "cpu")
    message = str(err.value)
    assert message.startswith("kernel cpu cannot run layer w3: ") and "3-bit" in message
    assert "\n" not in message and ". " not in message.rstrip(".")


def test_env_var_forces_reference(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "reference")
    model = _model()
    assert apply_kernel(model) == {"reference": len(model)}
    assert all(layer.kernel.name == "reference" for layer in model.values())


def test_env_var_cpu_and_explicit_argument_wins(monkeypatch) -> None:
    model = nn.ModuleDict({"a": QuantLinear.from_linear(nn.Linear(128, 16), QuantScheme(4, 32))})
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert apply_kernel(model) == {"cpu": 1}
    assert apply_kernel(model, "reference") == {"reference": 1}


@pytest.mark.parametrize("how", ["argument", "env"])
def test_unknown_kernel_fails(monkeypatch, how: str) -> None:
    model = _model()
    if how == "env":
        monkeypatch.setenv(ENV_VAR, "fastest")
    with pytest.raises(CompressError, match="unknown kernel 'fastest'"):
        apply_kernel(model, "fastest" if how == "argument" else "auto")


@pytest.mark.parametrize("symmetric", [True, False])
def test_tiny_llama_logits_cpu_vs_reference(symmetric: bool) -> None:
    """A whole Llama (hidden 128) with every Linear swapped for W4g32: cpu logits track the reference.

    The cpu path runs bf16 activations, so the bound is relative (1e-2 of the logits' norm) and the
    greedy next tokens must agree almost everywhere."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config).eval()
    scheme = QuantScheme(4, 32, symmetric)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent_name), leaf, QuantLinear.from_linear(module, scheme))
    ids = torch.randint(0, 256, (2, 24))
    logits = {}
    for kernel in ("reference", "cpu"):
        counts = apply_kernel(model, kernel)
        assert counts == {kernel: 14}
        with torch.inference_mode():
            logits[kernel] = model(input_ids=ids).logits.double()
    ref, got = logits["reference"], logits["cpu"]
    assert float((got - ref).norm() / ref.norm()) < 1e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
