"""Low-rank compensation through the whole path: sweep → export (PEFT adapter in lowrank/) → the readers.

- ``compress.load`` gives the logits of the in-memory compensated model, and loses them without the adapter;
- the size report counts the factor bytes exactly, as a component of their own;
- released transformers + compressed-tensors still load the main checkpoint (the plain quantized model), and
  PEFT attaches the adapter to that model, giving ``compress.load``'s logits;
- the manifest, card, report and recorded recipe state it; bad ranks are refused with one sentence.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.core.errors import CompressError
from compress.evaluate.size import (
    dir_size_bytes,
    lowrank_header_meta,
    safetensors_header_meta,
    weights_bytes_by_component,
)
from compress.export.adapter import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, lowrank_modules
from compress.export.checkpoint import checkpoint_tensors, quantization_config, write_config, write_weights
from compress.kernels.quant_linear import QuantLinear
from compress.pipeline.artifact import linear_names
from compress.pipeline.engine import compress_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import build_model, save_tiny, write_rotated_corpus  # noqa: E402

runner = CliRunner()
RANK = 8
STAGE = {"method": "lowrank", "rank": RANK, "quantizer": {"method": "gptq", "bits": 3, "group_size": 32}}


def _ids(seed: int, n: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
    """A compensated tiny llama in memory and its export (written as ``write_export`` writes the weights)."""
    model = build_model("llama").eval()
    model, records = compress_model(model, [STAGE], _ids(0, n=8, length=32))
    folder = tmp_path_factory.mktemp("lowrank") / "out"
    folder.mkdir()
    write_weights(checkpoint_tensors(model, records=records.layers), folder, 1 << 30)
    write_config(model.config, folder, quantization_config(model, linear_names(model), records=records.layers))
    from compress.export.adapter import write_adapter

    write_adapter(model, folder)
    return model, records, folder


def test_load_gives_the_in_memory_logits(in_memory):
    model, _, folder = in_memory
    loaded = compress.load(folder, device="cpu", kernel="reference")
    assert set(lowrank_modules(loaded)) == set(lowrank_modules(model)) and len(lowrank_modules(model)) == 14
    ids = _ids(1)
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
        for module in lowrank_modules(loaded).values():
            module.set_lowrank(None, None)
        assert not torch.allclose(loaded(ids).logits, expected, atol=1e-3)  # the adapter is what made them equal


def test_the_shards_hold_no_factor_and_the_size_counts_them(in_memory):
    model, _, folder = in_memory
    shard = safetensors_header_meta(folder)
    assert not [n for n in shard if "lora" in n]
    factors = sum(RANK * (m.in_features + m.out_features) * 4 for m in lowrank_modules(model).values())  # float32
    meta = {**shard, **lowrank_header_meta(folder)}
    components = weights_bytes_by_component(meta)
    assert components["lowrank"] == factors
    without = weights_bytes_by_component(shard)
    assert "lowrank" not in without and sum(components.values()) == sum(without.values()) + factors
    adapter = folder / ADAPTER_DIR / ADAPTER_WEIGHTS
    assert dir_size_bytes(folder) == (folder / "model.safetensors").stat().st_size + adapter.stat().st_size


def test_the_adapter_is_peft_shaped(in_memory):
    model, _, folder = in_memory
    config = json.loads((folder / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == RANK
    assert config["target_modules"] == sorted(lowrank_modules(model))
    with safe_open(str(folder / ADAPTER_DIR / ADAPTER_WEIGHTS), framework="pt") as handle:
        name = "model.layers.0.mlp.down_proj"
        a = handle.get_tensor(f"base_model.model.{name}.lora_A.weight")
        b = handle.get_tensor(f"base_model.model.{name}.lora_B.weight")
    layer = model.get_submodule(name)
    assert torch.equal(a, layer.lora_A) and torch.equal(b, layer.lora_B)
    assert list(a.shape) == [RANK, layer.in_features] and list(b.shape) == [layer.out_features, RANK]


def test_a_broken_adapter_is_refused(in_memory, tmp_path):
    _, _, folder = in_memory
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    config = copy / ADAPTER_DIR / ADAPTER_CONFIG
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "r": RANK + 1, "lora_alpha": RANK + 1}))
    with pytest.raises(CompressError, match="stores rank 8"):
        compress.load(copy, device="cpu")
    (copy / ADAPTER_DIR / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    config.write_text(json.dumps(data))
    with pytest.raises(CompressError, match="corrupt"):
        compress.load(copy, device="cpu")


def test_compensation_needs_calibration_data():
    with pytest.raises(CompressError, match="need calibration"):
        compress_model(build_model("llama"), [STAGE], None)


# ---- through the CLI, and the released readers ------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lowrank-cli")
    model = save_tiny("llama", root / "llama")
    corpus = write_rotated_corpus(root / "calib.txt")
    recipe = {"model": str(model), "stages": [STAGE], "output": str(root / "out"), "eval": {"enabled": False},
              "calibration": {"dataset": str(corpus), "num_samples": 4, "seq_len": 32}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(root / "recipe.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    return root / "out"


def test_transformers_loads_the_main_checkpoint_and_peft_attaches_the_adapter(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ours = compress.load(exported, device="cpu", kernel="reference")
    theirs = AutoModelForCausalLM.from_pretrained(str(exported))
    ids = _ids(2)
    with torch.no_grad():
        compensated = ours(ids).logits
        plain = theirs(ids).logits  # the package decompresses on the first forward
        for module in lowrank_modules(ours).values():
            module.set_lowrank(None, None)
        torch.testing.assert_close(plain, ours(ids).logits, rtol=1e-4, atol=1e-4)  # the plain quantized model
        attached = PeftModel.from_pretrained(theirs, str(exported / ADAPTER_DIR)).eval()
        torch.testing.assert_close(attached(ids).logits, compensated, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, compensated, atol=1e-3)


def test_the_artifact_states_it(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}" in manifest["files"] and f"{ADAPTER_DIR}/{ADAPTER_CONFIG}" in manifest["files"]
    ranked = [layer for layer in manifest["layers"] if layer.get("lowrank_rank") == RANK]
    assert len(ranked) == 14 and all(layer["methods"] == ["lowrank"] for layer in ranked)
    report = json.loads((exported / "report.json").read_text())
    assert {layer["scheme"] for layer in report["layers"]} == {"w3g32"}
    assert all(layer["lowrank_rank"] == RANK for layer in report["layers"])
    card = (exported / "README.md").read_text()
    assert "## Low-rank error compensation" in card and "PeftModel.from_pretrained" in card
    recorded = yaml.safe_load((exported / "recipe.yaml").read_text())
    assert recorded["stages"][0]["quantizer"]["bits"] == 3 and recorded["stages"][0]["rank"] == RANK
    loaded = compress.load(exported, device="cpu")
    assert all(isinstance(m, QuantLinear) for m in lowrank_modules(loaded).values())


def test_convert_keeps_the_adapter(exported, tmp_path):
    """The factors name layers, not a layout: converting to the GPTQ layout carries them over."""
    result = runner.invoke(app, ["convert", str(exported), "--to", "gptq", "--output", str(tmp_path / "gptq"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (tmp_path / "gptq" / ADAPTER_DIR / name).read_bytes() == (exported / ADAPTER_DIR / name).read_bytes()
    assert len(lowrank_modules(compress.load(tmp_path / "gptq", device="cpu"))) == 14


@pytest.mark.parametrize("rank, words", [(0, "greater than 0"), (32, "below min(in, out) = 32")])
def test_bad_ranks_exit_2_with_one_sentence(tmp_path, rank, words):
    model = save_tiny("llama", tmp_path / "llama")
    corpus = write_rotated_corpus(tmp_path / "calib.txt")
    recipe = {"model": str(model), "stages": [{**STAGE, "rank": rank}], "output": str(tmp_path / "out"),
              "eval": {"enabled": False}, "calibration": {"dataset": str(corpus), "num_samples": 2, "seq_len": 16}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("[compress]")]  # progress
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.output, result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_helper_wraps_the_quantizer_stage():
    from compress.cli._lowrank import lowrank_arguments

    flags = {"stages.*.method": "rtn", "stages.*.bits": 3, "stages.*.group_size": 32, "model": None}
    spent, overrides = lowrank_arguments("w4a16-rtn", flags, 16)  # as --method rtn: rtn's own preset
    assert spent == {"model": None}
    key, _, value = overrides[-1].partition("=")
    stage = yaml.safe_load(value)[0]
    assert key == "stages" and stage["method"] == "lowrank" and stage["rank"] == 16
    assert stage["quantizer"]["method"] == "rtn" and stage["quantizer"]["bits"] == 3
    from compress.recipes.flags import recipe_from_flags
    from compress.recipes.loader import apply_overrides, load_recipe_data

    recipe = recipe_from_flags(apply_overrides(load_recipe_data("w4a16-rtn"), overrides), spent)  # as execute_recipe
    assert [s.method for s in recipe.stages] == ["lowrank"] and recipe.stages[0].quantizer.group_size == 32
    with pytest.raises(CompressError, match="positive rank"):
        lowrank_arguments("w4a16-gptq", flags, 0)
    with pytest.raises(CompressError, match="--bits"):  # a bad flag is still named by its flag
        lowrank_arguments("w4a16-rtn", {**flags, "stages.*.bits": 5}, 16)
    with pytest.raises(CompressError, match="layer-wise quantizers"):
        lowrank_arguments("w4a16-awq", {}, 16)
    assert lowrank_arguments("w4a16-gptq", flags, None) == (flags, [])
    from compress.cli._rotate import rotation_overrides

    rotated = rotation_overrides("w4a16-gptq", "hadamard", None)  # --rotate's override comes first
    spent, overrides = lowrank_arguments("w4a16-gptq", {"stages.*.bits": 3}, 16, rotated)
    recipe = recipe_from_flags(apply_overrides(load_recipe_data("w4a16-gptq"), overrides), spent)
    assert [s.method for s in recipe.stages] == ["rotate", "lowrank"] and recipe.stages[1].quantizer.bits == 3
    spent, overrides = lowrank_arguments("w4a16-rotate-gptq", {"stages.*.bits": 3}, 16)  # a rotated base recipe
    recipe = recipe_from_flags(apply_overrides(load_recipe_data("w4a16-rotate-gptq"), overrides), spent)
    assert [s.method for s in recipe.stages] == ["rotate", "lowrank"] and recipe.stages[1].quantizer.bits == 3
