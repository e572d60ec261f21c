"""Group and block steps through the one sweep: a real fold into producers, and a real block reconstruction.

``ScaleFold`` is the transform AWQ and SmoothQuant share, with random scales: each group's producer output
channels ``· s``, its readers' input columns ``· 1/s``. If the producer table (or the learned fallback)
named the wrong module, or a fused producer's wrong rows, the model's logits would change.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, FalconConfig, GemmaConfig

import compress.models.producers as producers
from compress.core.errors import CompressError
from compress.kernels.quant_linear import QuantLinear
from compress.models.blocks import convert_conv1d_to_linear, find_blocks, select_layers
from compress.passes import PASSES
from compress.passes.base import BlockPass, BlockWork, GroupPass, PassConfig
from compress.passes.groups import Group, fold_scale_
from compress.pipeline.engine import compress_model
from compress.pipeline.sequential import sweep
from compress.pipeline.steps import PassStep

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import build_model  # noqa: E402

CPU = torch.device("cpu")


class _FoldConfig(PassConfig):
    method: Literal["scalefold"] = "scalefold"


class ScaleFold(GroupPass):
    """Test-only group pass: a random positive scale folded into every group that has a producer."""

    config_cls = _FoldConfig
    needs_producer: ClassVar[bool] = False

    def __init__(self, config) -> None:
        super().__init__(config)
        self.seen: list[tuple[tuple[str, ...], str | None]] = []

    def apply_group(self, group: Group, stats) -> dict[str, nn.Module]:
        self.seen.append((group.names, None if group.producer is None else group.producer.name))
        if group.producer is not None:
            generator = torch.Generator().manual_seed(len(self.seen))
            fold_scale_(group, torch.empty(group.in_features).uniform_(0.25, 4.0, generator=generator))
        return {}


class StrictScaleFold(ScaleFold):
    needs_producer: ClassVar[bool] = True


def model_of(family: str) -> nn.Module:
    if family == "falcon":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(FalconConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)).eval()
    elif family == "gemma":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(GemmaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)).eval()
    else:
        model = build_model(family)
    convert_conv1d_to_linear(model)
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out[0]


def run(model: nn.Module, layer_pass, ids: torch.Tensor, ignore=("lm_head",)) -> list:
    path, _ = find_blocks(model)
    with torch.inference_mode():
        return sweep(model, path, [PassStep(layer_pass, select_layers(model, ignore=ignore), path)], device=CPU,
                     input_ids=ids)


IDS = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(0))
PRODUCED = {  # block 0: producer of each group, as the sweep hands them to the pass
    "llama": ["input_layernorm", None, "post_attention_layernorm", "mlp.up_proj"],
    "opt": ["self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"],
    "gpt2": ["ln_1", "attn.c_attn", "ln_2", None],
    "phi": ["input_layernorm", "self_attn.v_proj", None],
    "gpt_neox": ["input_layernorm", None, "post_attention_layernorm", None],
    "falcon": ["input_layernorm", None, None],
    "bert": [None, None, None, None],  # the learned norm of intermediate.dense also feeds the residual
}


@pytest.mark.parametrize("family", sorted(PRODUCED))
def test_folding_scales_into_producers_keeps_the_logits(family):
    model = model_of(family)
    before = logits(model, IDS)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    layer_pass = ScaleFold(_FoldConfig())
    records = run(model, layer_pass, IDS)
    path, _ = find_blocks(model)
    block0 = [(names, None if p is None else p.removeprefix(f"{path}.0.")) for names, p in layer_pass.seen
              if names[0].startswith(f"{path}.0.")]
    assert [p for _, p in block0] == PRODUCED[family]
    assert len(records) == len(select_layers(model))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert changed if any(PRODUCED[family]) else not changed  # the folds really moved magnitudes
    torch.testing.assert_close(logits(model, IDS), before, rtol=1e-4, atol=1e-4)


def test_the_learned_fallback_folds_into_the_norms(monkeypatch):
    monkeypatch.setattr(producers, "_TABLE", {})
    model = model_of("llama")
    before = logits(model, IDS)
    layer_pass = ScaleFold(_FoldConfig())
    run(model, layer_pass, IDS)
    assert [p and p.rsplit(".", 1)[-1] for _, p in layer_pass.seen[:4]] == [
        "input_layernorm", None, "post_attention_layernorm", None]
    torch.testing.assert_close(logits(model, IDS), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("family", "layer"), [
    ("llama", "model.layers.0.self_attn.o_proj"),  # GQA: V is narrower than o_proj's input
    ("bert", "encoder.layer.0.attention.self.query"),  # post-norm: the block input has no producer
    ("gemma", "model.layers.0.self_attn.q_proj"),  # no entry; its (1 + w) norm fails the fold check
])
def test_a_pass_that_needs_a_producer_refuses_in_one_sentence(family, layer):
    model = model_of(family)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompressError, match=f"producing the input of {layer}") as error:
        run(model, StrictScaleFold(_FoldConfig()), IDS)
    assert "\n" not in str(error.value)
    if family == "gemma":  # the rejected trial fold was undone
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_ignore_patterns_cannot_split_a_group():
    with pytest.raises(CompressError, match=r"leave out model\.layers\.0\.self_attn\.k_proj"):
        run(model_of("llama"), ScaleFold(_FoldConfig()), IDS, ignore=("lm_head", "*k_proj"))


def test_folds_compose_with_quantization_and_the_stage_order_sees_producers(monkeypatch):
    monkeypatch.setitem(PASSES._items, "scalefold", ScaleFold)
    model = model_of("llama")
    model, records = compress_model(model, [{"method": "scalefold"}, {"method": "rtn", "bits": 8, "group_size": 32}],
                                    IDS)
    assert len(records) == 28 and sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    # rtn quantizes up_proj first; folding into down_proj's input would rescale up_proj, its producer
    stages = [{"method": "rtn", "bits": 8, "group_size": 32, "ignore": ["lm_head", "re:.*(q|k|v|o|gate|down)_proj"]},
              {"method": "scalefold", "ignore": ["lm_head", "re:.*(q|k|v|o|gate|up)_proj"]}]
    with pytest.raises(CompressError, match=r"stage 1 \(scalefold\) rewrites model\.layers\.0\.mlp\.up_proj.*"
                                            "already quantized"):
        compress_model(model_of("llama"), stages, IDS)


class _BlockConfig(PassConfig):
    method: Literal["refit"] = "refit"


class Reconstruct(BlockPass):
    """Test-only block pass: damage down_proj, then refit it by gradient descent to the block's original
    outputs, the shape of a block-output reconstruction (AutoRound) solve."""

    config_cls = _BlockConfig
    needs_grad: ClassVar[bool] = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.errors: list[tuple[float, float]] = []
        self.targets: list[torch.Tensor] = []

    def apply_block(self, work: BlockWork) -> dict[str, Any]:
        self.targets.append(work.targets[0].detach().clone())
        with torch.no_grad():  # before any change, the block reproduces its targets
            assert all(torch.equal(work.forward(i), y) for i, y in enumerate(work.targets))
        down = next(layer for name, layer in work.layers.items() if name.endswith("down_proj"))

        def error() -> torch.Tensor:
            return sum(nn.functional.mse_loss(work.forward(i), y) for i, y in enumerate(work.targets))

        with torch.no_grad():
            down.weight.mul_(0.5)
            start = error().item()
        down.weight.requires_grad_(True)
        optimiser = torch.optim.Adam([down.weight], lr=5e-3)
        for _ in range(60):
            optimiser.zero_grad()
            error().backward()
            optimiser.step()
        down.weight.requires_grad_(False)
        with torch.no_grad():
            self.errors.append((start, error().item()))
        return {}


def test_a_block_step_sees_its_original_outputs_and_can_learn_against_them():
    model = model_of("llama")
    with torch.inference_mode():
        reference = model(input_ids=IDS, output_hidden_states=True).hidden_states
    layer_pass = Reconstruct(_BlockConfig())
    records = run(model, layer_pass, IDS)
    assert len(records) == 14 and len(layer_pass.errors) == 2
    torch.testing.assert_close(layer_pass.targets[0], reference[1], rtol=1e-5, atol=1e-5)
    assert all(end < 0.2 * start for start, end in layer_pass.errors), layer_pass.errors
