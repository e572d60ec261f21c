"""The block sweep: block-0 capture, true-sequential groups, and re-propagation, on every causal family."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch
from torch import nn

from compress.calibrate.capture import block_output, capture_block_inputs
from compress.calibrate.stats import HessianStats
from compress.kernels.quant_linear import QuantLinear
from compress.models.blocks import convert_conv1d_to_linear, find_blocks, select_layers
from compress.passes.base import LayerPass
from compress.passes.quantize.rtn import RTNConfig
from compress.pipeline.groups import execution_groups
from compress.pipeline.sequential import sweep
from compress.pipeline.steps import PassStep

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import CAUSAL_FAMILIES, build_model  # noqa: E402


class _RecordingConfig(RTNConfig):
    method: Literal["rtn"] = "rtn"


class RecordingPass(LayerPass):
    """RTN that needs calibration, so the sweep's capture/propagation path runs; records what it saw."""

    config_cls = _RecordingConfig
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.seen: dict[str, int] = {}
        self.order: list[str] = []

    def make_stats(self, name: str, linear: nn.Linear) -> HessianStats:
        return HessianStats(linear.in_features)

    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        self.seen[name] = stats.tokens
        self.order.append(name)
        return QuantLinear.from_linear(linear, self.config.scheme)


def run_layerwise(model, path, blocks, plan, **kwargs):
    """The sweep with one layer-wise step per (pass, names), as compress_model builds it."""
    return sweep(model, path, [PassStep(p, names, path) for p, names in plan], **kwargs)


def _model(family: str) -> nn.Module:
    model = build_model(family).eval()
    convert_conv1d_to_linear(model)
    return model


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_capture_reproduces_the_models_own_block_inputs(family):
    model = _model(family)
    path, blocks = find_blocks(model)
    ids = torch.randint(3, 100, (3, 16))
    inputs = capture_block_inputs(model, blocks, ids, device=torch.device("cpu"))
    assert len(inputs) == 3
    with torch.inference_mode():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
        for i, item in enumerate(inputs):
            torch.testing.assert_close(item.hidden, reference[0][i:i + 1])
            torch.testing.assert_close(block_output(blocks[0], item), reference[1][i:i + 1], rtol=1e-5, atol=1e-5)
    assert blocks[0].__class__.__name__ != "_Catcher"


def test_llama_groups_follow_execution_order():
    model = _model("llama")
    _, blocks = find_blocks(model)
    ids = torch.randint(3, 100, (1, 8))
    sample = capture_block_inputs(model, blocks, ids, device=torch.device("cpu"))[0]
    names = [n for n in select_layers(model) if n.startswith("model.layers.0.")]
    with torch.inference_mode():
        found = execution_groups(model, blocks[0], names, sample, torch.device("cpu"))
    short = [[n.rsplit(".", 1)[-1] for n in g] for g in found.groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert found.stop_early  # every layer called once: the group forwards may stop at the group


class HessianRecordingPass(RecordingPass):
    """Keeps each layer's Hessian, to compare sweeps that batch or stop their forwards differently."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.hessians: dict[str, torch.Tensor] = {}

    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        self.hessians[name] = stats.hessian.clone()
        return super().apply(name, linear, stats)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "bert"])
def test_early_exit_and_batching_see_the_same_inputs(family, monkeypatch):
    """Stopping each group's forward at the group, and running several samples per forward, must feed
    every layer the same inputs as full one-sample forwards: same token counts, same Hessians, same
    quantized model."""
    import compress.pipeline.sequential as sequential

    ids = torch.randint(3, 100, (6, 16))
    runs = {}
    for label, early, budget in [("full-one-by-one", False, 16), ("early-batched", True, 64)]:
        monkeypatch.setattr(sequential, "forward_batch_size",
                            lambda n, s, budget=budget: max(1, min(n, budget // s)))
        torch.manual_seed(0)
        model = _model(family)
        path, blocks = find_blocks(model)
        layer_pass = HessianRecordingPass(_RecordingConfig(bits=8, group_size=32))
        with torch.inference_mode():
            run_layerwise(model, path, blocks, [(layer_pass, select_layers(model))], device=torch.device("cpu"),
                          input_ids=ids, early_exit=early)
            logits = model(input_ids=ids[:2]).logits if family != "bert" else model(input_ids=ids[:2])[0]
        runs[label] = (layer_pass, logits)
    one, other = runs["full-one-by-one"][0], runs["early-batched"][0]
    assert one.seen == other.seen and all(t == 6 * 16 for t in one.seen.values())
    for name, hessian in one.hessians.items():
        torch.testing.assert_close(other.hessians[name], hessian, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(runs["early-batched"][1], runs["full-one-by-one"][1], rtol=1e-4, atol=1e-4)


def test_quant_linear_dense_cache_is_bit_identical():
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    layer = QuantLinear.from_linear(linear, _RecordingConfig(bits=4, group_size=32).scheme)
    x = torch.randn(3, 64)
    reference = layer(x)
    layer.hold_dense_weight(torch.float32)
    assert layer._dense_cache is not None
    assert torch.equal(layer(x), reference)
    assert "_dense_cache" not in layer.state_dict()
    layer.drop_dense_weight()
    assert layer._dense_cache is None and torch.equal(layer(x), reference)


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_calibrated_sweep_sees_every_token_and_quantizes_every_layer(family):
    model = _model(family)
    path, blocks = find_blocks(model)
    names = select_layers(model)
    layer_pass = RecordingPass(_RecordingConfig(bits=8, group_size=32))
    ids = torch.randint(3, 100, (4, 12))
    with torch.inference_mode():
        results = run_layerwise(model, path, blocks, [(layer_pass, names)], device=torch.device("cpu"),
                                input_ids=ids)
    assert len(results) == len(names)
    assert set(layer_pass.seen) == set(names)
    assert all(tokens == 4 * 12 for tokens in layer_pass.seen.values())
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    # blocks are visited in order
    block_of = [int(n[len(path) + 1:].split(".")[0]) for n in layer_pass.order]
    assert block_of == sorted(block_of)


class _Passthrough(HessianRecordingPass):
    """Records Hessians but leaves every layer dense, so later groups see uncompressed inputs."""

    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        self.hessians[name] = stats.hessian.clone()
        return linear


def test_true_sequential_off_calibrates_every_group_on_the_blocks_own_inputs():
    ids = torch.randint(3, 100, (4, 16))

    def hessians(layer_pass, true_sequential):
        torch.manual_seed(0)
        model = _model("llama")
        path, blocks = find_blocks(model)
        with torch.inference_mode():
            run_layerwise(model, path, blocks, [(layer_pass, select_layers(model))], device=torch.device("cpu"),
                          input_ids=ids, true_sequential=true_sequential)
        return {n: h for n, h in layer_pass.hessians.items() if n.startswith("model.layers.0.")}

    dense = hessians(_Passthrough(_RecordingConfig(bits=2, group_size=32)), True)
    off = hessians(HessianRecordingPass(_RecordingConfig(bits=2, group_size=32)), False)
    on = hessians(HessianRecordingPass(_RecordingConfig(bits=2, group_size=32)), True)
    o_proj = "model.layers.0.self_attn.o_proj"
    for name, hessian in dense.items():  # one forward on the block's inputs: nothing compressed yet
        torch.testing.assert_close(off[name], hessian, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(on[o_proj], dense[o_proj], rtol=1e-3)  # true-sequential sees 2-bit q/k/v outputs
