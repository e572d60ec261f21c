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
from compress.pipeline.sequential import execution_groups, run_layerwise

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
        groups = execution_groups(model, blocks[0], names, sample, torch.device("cpu"))
    short = [[n.rsplit(".", 1)[-1] for n in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


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
