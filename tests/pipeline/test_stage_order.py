"""Stage order: an impossible composition is one sentence and exit 2 before any weight loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.core.errors import CompressError
from compress.models.load import load_config
from compress.pipeline.stage_order import check_recipe_order
from compress.recipes.loader import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("order") / "llama")


def _recipe(model: Path, stages: list[dict]):
    return recipe_from_dict({"model": str(model), "stages": stages, "eval": {"enabled": False},
                             "calibration": {"num_samples": 2, "seq_len": 16}})


@pytest.mark.parametrize("stages", [
    [{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "gptq", "bits": 4, "group_size": 32}],
    [{"method": "gptq", "bits": 4, "group_size": 32}, {"method": "magnitude", "sparsity": 0.5}],
    [{"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 32}, {"method": "rtn", "bits": 8}],
])
def test_quantized_layers_cannot_be_rewritten(llama, stages, tmp_path, monkeypatch):
    import compress.pipeline.run as run_module

    monkeypatch.setattr(run_module, "_load", lambda *a: (_ for _ in ()).throw(AssertionError("weights loaded")))
    recipe = _recipe(llama, stages)
    with pytest.raises(CompressError, match="already quantized"):
        check_recipe_order(recipe, load_config(str(llama)))
    out = tmp_path / "out"
    with pytest.raises(CompressError, match="stage 1 .* already quantized"):
        compress.run(recipe, out)
    assert not out.exists()


@pytest.mark.parametrize("stages", [
    [{"method": "magnitude", "sparsity": 0.5}, {"method": "gptq", "bits": 4, "group_size": 32}],
    [{"method": "wanda", "sparsity": 0.5}, {"method": "rtn", "bits": 4, "group_size": 32}],
    [{"method": "rtn", "bits": 8, "group_size": -1, "ignore": ["lm_head", "*q_proj", "*k_proj", "*v_proj"]},
     {"method": "rtn", "bits": 4, "group_size": 32, "ignore": ["lm_head", "*o_proj", "*mlp*"]}],
])
def test_sensible_compositions_pass(llama, stages):
    check_recipe_order(_recipe(llama, stages), load_config(str(llama)))


def test_cli_refuses_the_order_in_one_sentence(llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {llama}\nstages:\n  - {{method: rtn, bits: 4, group_size: 32}}\n"
                      "  - {method: gptq, bits: 4, group_size: 32}\neval: {enabled: false}\n")
    result = runner.invoke(app, ["run", str(recipe), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "already quantized" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


STRUCTURED = {"method": "structured", "target": "channels", "ratio": 0.25}


@pytest.mark.parametrize("stages", [
    [{"method": "rtn", "bits": 4, "group_size": 32}, STRUCTURED],
    [{"method": "magnitude", "sparsity": 0.5}, STRUCTURED, {"method": "rtn", "bits": 4, "group_size": 32}],
])
def test_structured_after_a_layerwise_stage_is_refused_before_loading(llama, stages, tmp_path, monkeypatch):
    import compress.pipeline.run as run_module

    monkeypatch.setattr(run_module, "_load", lambda *a: (_ for _ in ()).throw(AssertionError("weights loaded")))
    recipe = _recipe(llama, stages)
    with pytest.raises(CompressError, match=r"stage 1 \(structured\)|stage 2 \(structured\)") as error:
        check_recipe_order(recipe, load_config(str(llama)))
    assert "must come before layer-wise stages" in str(error.value)
    with pytest.raises(CompressError, match="must come before layer-wise stages"):
        compress.run(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_structured_stages_then_layerwise_ones_pass(llama):
    check_recipe_order(_recipe(llama, [STRUCTURED, {"method": "structured", "target": "blocks", "num_blocks": 1},
                                       {"method": "wanda", "sparsity": 0.5},
                                       {"method": "gptq", "bits": 4, "group_size": 32}]), load_config(str(llama)))


def test_cli_refuses_structured_after_quantize_with_exit_2(llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {llama}\nstages:\n  - {{method: rtn, bits: 4, group_size: 32}}\n"
                      "  - {method: structured, target: blocks, num_blocks: 1}\neval: {enabled: false}\n")
    result = runner.invoke(app, ["run", str(recipe), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "must come before layer-wise stages" in result.stderr
    assert not (tmp_path / "o").exists()
