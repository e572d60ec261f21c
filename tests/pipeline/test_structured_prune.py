"""Structured pruning end to end: run() writes a plain, smaller transformers checkpoint that loads with no custom
code, holds the parameter count it claims and computes what the pruned model computed in memory."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import compress
from compress.calibrate.data import calibration_samples
from compress.core.errors import CompressError
from compress.evaluate.size import parameter_count
from compress.models.load import load_model
from compress.pipeline.engine import compress_model
from compress.recipes.loader import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import HEADS, HIDDEN, INTERMEDIATE, LAYERS, save_tiny  # noqa: E402

SAMPLES, SEQ = 2, 16
GQA = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(40)))
    return path


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = save_tiny(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def _recipe(model_dir: Path, corpus: Path, *stages: dict, evaluate: bool = False, **extra) -> object:
    return recipe_from_dict({
        "model": str(model_dir),
        "calibration": {"dataset": str(corpus), "num_samples": SAMPLES, "seq_len": SEQ},
        "eval": {"enabled": evaluate, "dataset": str(corpus), "seq_len": SEQ},
        "stages": [{"method": "structured", **s} for s in stages], **extra,
    })


def _pruned_in_memory(model_dir: Path, corpus: Path, stage: dict) -> torch.nn.Module:
    loaded = load_model(str(model_dir))
    ids = calibration_samples(loaded.tokenizer, str(corpus), SAMPLES, SEQ, seed=0).input_ids
    model, records = compress_model(loaded.model, [{"method": "structured", **stage}], ids)
    assert not records and records.structured[0]["target"] == stage["target"]
    return model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _llama_params(layers: int, intermediate: int, heads: int, kv: int, head_dim: int = HIDDEN // HEADS) -> int:
    """Parameters of the tiny Llama layout (untied embeddings, no biases) for a given shape."""
    attention = HIDDEN * head_dim * (2 * heads + 2 * kv)
    block = attention + 3 * HIDDEN * intermediate + 2 * HIDDEN
    return layers * block + 2 * 128 * HIDDEN + HIDDEN


EXPECTED_SHAPE = {  # (layers, intermediate, heads, kv) after each stage on the 2-layer, 4-head / 2-KV tiny model
    "channels": (LAYERS, INTERMEDIATE - 32, HEADS, 2),
    "heads": (LAYERS, INTERMEDIATE, 2, 2),  # 25% of 4 heads: the nearest GQA cut is one query head per group
    "blocks": (LAYERS - 1, INTERMEDIATE, HEADS, 2),
}


@pytest.mark.parametrize("family", GQA)
@pytest.mark.parametrize("target", ["channels", "heads", "blocks"])
def test_plain_checkpoint_loads_claims_its_size_and_matches_memory(family, target, family_dir, corpus, tmp_path):
    model_dir = family_dir(family)
    stage = {"target": target, "ratio": 0.25}
    out = tmp_path / "out"
    compress.run(_recipe(model_dir, corpus, stage), out)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    layers, intermediate, heads, kv = EXPECTED_SHAPE[target]
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (layers, intermediate)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (heads, kv)
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    if target == "heads":  # hidden / heads no longer gives it: written explicitly
        assert config["head_dim"] == HIDDEN // HEADS
    assert len(config.get("layer_types") or [None] * layers) == layers

    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no custom code, no compress
    report = json.loads((out / "report.json").read_text())
    assert parameter_count(plain) == report["parameters_after"]
    if family == "llama":
        assert report["parameters_after"] == _llama_params(layers, intermediate, heads, kv)
    assert report["parameters_after"] < report["parameters"]

    ids = torch.randint(4, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(plain, ids), _logits(_pruned_in_memory(model_dir, corpus, stage), ids),
                               rtol=0, atol=1e-5)
    with torch.inference_mode():  # the KV cache works with the new shapes (renumbered layers, fewer heads)
        generated = plain.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    assert {"manifest.json", "recipe.yaml", "report.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("family", ["opt", "gpt2", "gpt_neox", "phi"])
@pytest.mark.parametrize("target", ["channels", "blocks"])
def test_non_gated_families(family, target, family_dir, corpus, tmp_path):
    model_dir = family_dir(family)
    stage = {"target": target, "ratio": 0.25}
    out = tmp_path / "out"
    compress.run(_recipe(model_dir, corpus, stage), out)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert parameter_count(plain) == json.loads((out / "report.json").read_text())["parameters_after"]
    ids = torch.randint(4, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(plain, ids), _logits(_pruned_in_memory(model_dir, corpus, stage), ids),
                               rtol=0, atol=1e-5)


def test_heads_whole_kv_groups(family_dir, corpus, tmp_path):
    out = tmp_path / "out"
    compress.run(_recipe(family_dir("llama"), corpus, {"target": "heads", "ratio": 0.5, "head_grouping": "kv"}), out)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
    weights = load_file(out / "model.safetensors")
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (16, HIDDEN)
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (32, HIDDEN)
    AutoModelForCausalLM.from_pretrained(out)


def _edit_weights(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _kept_columns(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    return [next(j for j in range(original.shape[1]) if torch.equal(original[:, j], pruned[:, i]))
            for i in range(pruned.shape[1])]


def test_channels_are_chosen_by_calibrated_importance_not_magnitude(family_dir, corpus, tmp_path):
    """Channel 5: the largest weights but an all-zero up row (it never fires). Channel 9: the smallest down
    column (its input row scaled up to compensate). Magnitude would remove 9 and keep 5; calibrated importance
    removes the channel that never fires and keeps the one that carries signal."""
    def edit(t):
        for i in range(LAYERS):
            p = f"model.layers.{i}.mlp."
            t[p + "gate_proj.weight"][5] *= 10
            t[p + "up_proj.weight"][5] = 0
            t[p + "down_proj.weight"][:, 5] *= 10
            t[p + "down_proj.weight"][:, 9] *= 1e-2  # 10x its old contribution, the smallest column
            t[p + "up_proj.weight"][9] *= 1e3
    model_dir = _edit_weights(family_dir("llama"), tmp_path / "edited", edit)
    original = load_file(model_dir / "model.safetensors")
    for i in range(LAYERS):  # the premise: by weight magnitude, 5 is the channel to keep and 9 the one to drop
        p = f"model.layers.{i}.mlp."
        column = original[p + "down_proj.weight"].norm(dim=0)
        assert column.argmax() == 5 and column.argmin() == 9
        rows = sum(original[p + n].norm(dim=1) for n in ("gate_proj.weight", "up_proj.weight")) + column
        assert rows[5] > rows.median()
    out = tmp_path / "out"
    compress.run(_recipe(model_dir, corpus, {"target": "channels", "ratio": 0.25}), out)
    pruned = load_file(out / "model.safetensors")
    for i in range(LAYERS):  # gate rows are sliced, never refit: they name the kept channels
        key = f"model.layers.{i}.mlp.gate_proj.weight"
        kept = _kept_columns(original[key].T, pruned[key].T)
        assert 5 not in kept and 9 in kept


@pytest.mark.parametrize("passive", [0, 1])
def test_block_drop_removes_the_block_that_changes_its_input_least(passive, family_dir, corpus, tmp_path):
    def edit(t):  # outputs of both residual branches ~0: the block passes its input through
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            t[f"model.layers.{passive}.{name}"] *= 1e-4
    model_dir = _edit_weights(family_dir("llama"), tmp_path / "edited", edit)
    original = load_file(model_dir / "model.safetensors")
    out = tmp_path / "out"
    compress.run(_recipe(model_dir, corpus, {"target": "blocks", "num_blocks": 1}), out)
    report = json.loads((out / "report.json").read_text())["structured"][0]
    assert report["dropped"] == [passive] and report["scores"][passive] < report["scores"][1 - passive]
    survivor = load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(survivor, original[f"model.layers.{1 - passive}.mlp.up_proj.weight"])


def test_structured_then_quantize_in_one_recipe(family_dir, corpus, tmp_path):
    recipe = recipe_from_dict({
        "model": str(family_dir("llama")),
        "calibration": {"dataset": str(corpus), "num_samples": SAMPLES, "seq_len": SEQ},
        "eval": {"dataset": str(corpus), "seq_len": SEQ},
        "stages": [{"method": "structured", "target": "channels", "ratio": 0.25},
                   {"method": "rtn", "bits": 4, "group_size": 32}],
    })
    out = tmp_path / "out"
    result = compress.run(recipe, out)
    assert result.layers == 7 * LAYERS and result.metrics["kl"] >= 0
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 96 and "quantization_config" in config
    assert compress.load(out, kernel="reference").model.layers[0].mlp.down_proj.in_features == 96


@pytest.mark.parametrize("family, stages, extra, message", [
    ("llama", [{"target": "channels", "ratio": 0.999}], {}, "every one of the 128 MLP channels"),
    ("llama", [{"target": "heads", "ratio": 0.9}], {}, "every one of the 4 attention heads"),
    ("llama", [{"target": "blocks", "num_blocks": 2}], {}, "would leave none"),
    ("gpt2", [{"target": "heads", "ratio": 0.25}], {}, "does not support gpt2 models"),
    ("bert", [{"target": "channels", "ratio": 0.25}], {}, "does not support bert models"),
    ("llama", [{"target": "channels", "ratio": 0.25, "ignore": ["re:.*mlp.*"]}], {}, "cannot exempt layers"),
    ("llama", [{"target": "channels", "ratio": 0.25}], {"export": {"format": "gptq"}}, "GPTQ layout"),
])
def test_bad_input_one_sentence_nothing_written(family, stages, extra, message, family_dir, corpus, tmp_path):
    out = tmp_path / "parent" / "out"
    with pytest.raises(CompressError, match=message):
        compress.run(_recipe(family_dir(family), corpus, *stages, **extra), out)
    assert not (tmp_path / "parent").exists()


def test_structured_after_a_layerwise_stage_is_refused(family_dir, corpus, tmp_path):
    recipe = recipe_from_dict({
        "model": str(family_dir("llama")), "stages": [{"method": "rtn"}, {"method": "structured",
                                                                          "target": "channels", "ratio": 0.25}],
    })
    with pytest.raises(CompressError, match="must come before layer-wise stages"):
        compress.run(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dry_run_refuses_what_the_run_would(family_dir, corpus):
    from compress.pipeline.run import dry_run

    with pytest.raises(CompressError, match="every one of the 4 attention heads"):
        dry_run(_recipe(family_dir("llama"), corpus, {"target": "heads", "ratio": 0.9}))
    plan = dry_run(_recipe(family_dir("llama"), corpus, {"target": "channels", "ratio": 0.25}))
    assert plan["stages"][0]["scheme"] == "channels25"
