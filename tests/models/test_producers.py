"""The producer table: for every family, which module produces the input of each group of linears.

Resolved on block 0 of each tiny model the way the sweep does it: one probing forward records which linears
read which tensor and which norm output it is, then ``resolve_producer`` names the producer. A wrong or
missing entry here would make a scaling method (AWQ, SmoothQuant) fold its scales into the wrong module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, FalconConfig, LlamaConfig

import compress.models.producers as producers
from compress.calibrate.capture import capture_block_inputs
from compress.models.blocks import convert_conv1d_to_linear, find_blocks, select_layers
from compress.models.producers import linear_producers, resolve_producer
from compress.pipeline.groups import execution_groups

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import build_model, tiny_config  # noqa: E402

_Q, _K, _V = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"
EXPECTED: dict[str, dict[frozenset[str], tuple[str, str] | None]] = {
    "llama": {  # 4 query heads on 2 KV heads: V is narrower than o_proj's input, so o_proj has no producer
        frozenset({_Q, _K, _V}): ("input_layernorm", "norm"),
        frozenset({"self_attn.o_proj"}): None,
        frozenset({"mlp.gate_proj", "mlp.up_proj"}): ("post_attention_layernorm", "norm"),
        frozenset({"mlp.down_proj"}): ("mlp.up_proj", "linear"),
    },
    "opt": {
        frozenset({_Q, _K, _V}): ("self_attn_layer_norm", "norm"),
        frozenset({"self_attn.out_proj"}): ("self_attn.v_proj", "linear"),
        frozenset({"fc1"}): ("final_layer_norm", "norm"),
        frozenset({"fc2"}): ("fc1", "linear"),  # ReLU between: positively homogeneous
    },
    "gpt2": {
        frozenset({"attn.c_attn"}): ("ln_1", "norm"),
        frozenset({"attn.c_proj"}): ("attn.c_attn", "linear"),  # the V rows of the fused projection
        frozenset({"mlp.c_fc"}): ("ln_2", "norm"),
        frozenset({"mlp.c_proj"}): None,  # GELU between c_fc and c_proj
    },
    "gpt_neox": {
        frozenset({"attention.query_key_value"}): ("input_layernorm", "norm"),
        frozenset({"attention.dense"}): None,
        frozenset({"mlp.dense_h_to_4h"}): ("post_attention_layernorm", "norm"),
        frozenset({"mlp.dense_4h_to_h"}): None,
    },
    "phi": {  # attention and MLP read one norm output: one group of four
        frozenset({_Q, _K, _V, "mlp.fc1"}): ("input_layernorm", "norm"),
        frozenset({"self_attn.dense"}): ("self_attn.v_proj", "linear"),
        frozenset({"mlp.fc2"}): None,
    },
    "falcon": {
        frozenset({"self_attention.query_key_value", "mlp.dense_h_to_4h"}): ("input_layernorm", "norm"),
        frozenset({"self_attention.dense"}): None,
        frozenset({"mlp.dense_4h_to_h"}): None,
    },
    "bert": {  # no table entry: q/k/v read the previous block's output; the learned norm candidate for
        # intermediate.dense also feeds the residual, which the sweep's fold check rejects (test_group_passes)
        frozenset({"attention.self.query", "attention.self.key", "attention.self.value"}): None,
        frozenset({"attention.output.dense"}): None,
        frozenset({"intermediate.dense"}): ("attention.output.LayerNorm", "norm"),
        frozenset({"output.dense"}): None,
    },
}
EXPECTED["qwen2"] = EXPECTED["mistral"] = EXPECTED["llama"]


def falcon_model() -> nn.Module:
    config = FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          new_decoder_architecture=False, parallel_attn=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def model_of(family: str) -> nn.Module:
    model = falcon_model() if family == "falcon" else build_model(family)
    convert_conv1d_to_linear(model)
    return model


def family_of(model: nn.Module) -> str:
    return model.config.model_type


def resolved(model: nn.Module) -> dict[frozenset[str], tuple[str, str] | None]:
    """Block 0's tensor groups (every linear of the block targeted) → (producer, kind) or None."""
    path, blocks = find_blocks(model)
    prefix = f"{path}.0"
    names = [n for n in select_layers(model, ignore=()) if n.startswith(prefix + ".")]
    sample = capture_block_inputs(model, blocks, torch.randint(3, 100, (2, 12)), device=torch.device("cpu"))[0]
    with torch.inference_mode():
        found = execution_groups(model, blocks[0], names, sample, torch.device("cpu"), with_readers=prefix)
        out = {}
        for group in found.by_tensor:
            spec = resolve_producer(model.config, blocks[0], group.readers, learned_norm=group.norm)
            assert spec is None or spec.learned == (family_of(model) not in producers._TABLE)
            out[frozenset(group.readers)] = None if spec is None else (spec.name, spec.kind)
    return out


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_table_resolves_every_group_of_each_family(family):
    assert resolved(model_of(family)) == EXPECTED[family]


def test_families_without_an_entry_learn_their_norms(monkeypatch):
    """Without the table, norms are still found from the forward (their output is the group's input);
    linear producers cannot be learned, so those groups have none."""
    monkeypatch.setattr(producers, "_TABLE", {})
    found = resolved(model_of("llama"))
    assert found[frozenset({_Q, _K, _V})] == ("input_layernorm", "norm")
    assert found[frozenset({"mlp.gate_proj", "mlp.up_proj"})] == ("post_attention_layernorm", "norm")
    assert found[frozenset({"mlp.down_proj"})] is None


def test_linear_producers_on_the_meta_model():
    """What the stage-order check reads: without GQA o_proj's input comes from v_proj."""
    config: LlamaConfig = tiny_config("llama")
    config.num_key_value_heads = config.num_attention_heads
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    path, blocks = find_blocks(model)
    found = linear_producers(config, model, path, blocks)
    assert found == {f"model.layers.{i}.{reader}": f"model.layers.{i}.{producer}" for i in range(2)
                     for reader, producer in (("self_attn.o_proj", _V), ("mlp.down_proj", "mlp.up_proj"))}
    gqa = tiny_config("llama")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gqa)
    assert "model.layers.0.self_attn.o_proj" not in linear_producers(gqa, model, path, find_blocks(model)[1])
