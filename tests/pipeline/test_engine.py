"""compress_model: the sweep in memory (no folder, no tokenizer), the same weights compress.run exports."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import compress
from compress.core.errors import CompressError
from compress.kernels.quant_linear import QuantLinear
from compress.models.load import load_model
from compress.pipeline.engine import compress_model, needs_calibration
from compress.recipes.loader import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402


def test_in_memory_rtn_needs_no_data_and_writes_nothing(tmp_path, monkeypatch):
    folder = save_tiny("llama", tmp_path / "llama")
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    model = load_model(str(folder)).model
    stages = [{"method": "rtn", "bits": 4, "group_size": 32}]
    assert not needs_calibration(stages)
    model, records = compress_model(model, stages)
    assert len(records) == 14 and all(r.tags == ("w4g32",) and r.scheme.tag == "w4g32" for r in records)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert sorted(os.listdir(tmp_path)) == before


def test_in_memory_gptq_equals_the_exported_run(tmp_path):
    folder = save_tiny("llama", tmp_path / "llama")
    recipe = recipe_from_dict({"model": str(folder), "eval": {"enabled": False},
                               "calibration": {"num_samples": 4, "seq_len": 32},
                               "stages": [{"method": "gptq", "bits": 4, "group_size": 32}]})
    compress.run(recipe, tmp_path / "out")
    exported = compress.load(tmp_path / "out", kernel="reference")

    from compress.calibrate.data import calibration_samples

    loaded = load_model(str(folder))
    ids = calibration_samples(loaded.tokenizer, "demo-calib", 4, 32, seed=0).input_ids
    with pytest.raises(CompressError, match="calibration"):
        compress_model(load_model(str(folder)).model, recipe.stages)
    model, records = compress_model(loaded.model, recipe.stages, ids)
    assert len(records) == 14
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(module.weight_packed, exported.get_submodule(name).weight_packed), name


def test_rtn_run_builds_no_calibration(tmp_path, monkeypatch):
    """A data-free method neither tokenizes nor fingerprints calibration text (it used to build all of it)."""
    import compress.pipeline.run as run_module

    folder = save_tiny("llama", tmp_path / "llama")
    monkeypatch.setattr(run_module, "calibration_samples",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("calibration was built")))
    recipe = recipe_from_dict({"model": str(folder), "eval": {"enabled": False},
                               "stages": [{"method": "rtn", "bits": 4, "group_size": 32}]})
    result = compress.run(recipe, tmp_path / "out")
    assert result.calibration is None and result.layers == 14


def test_in_memory_structured_then_quantize_equals_the_exported_run(tmp_path):
    """compress_model runs structured stages too (their own sweep, first): same shapes, same codes and the
    same structured report as the exported run."""
    import json

    from compress.calibrate.data import calibration_samples

    folder = save_tiny("llama", tmp_path / "llama")
    recipe = recipe_from_dict({"model": str(folder), "eval": {"enabled": False},
                               "calibration": {"num_samples": 4, "seq_len": 32},
                               "stages": [{"method": "structured", "target": "heads", "ratio": 0.25},
                                          {"method": "structured", "target": "blocks", "num_blocks": 1},
                                          {"method": "gptq", "bits": 4, "group_size": 32}]})
    compress.run(recipe, tmp_path / "out")
    exported = compress.load(tmp_path / "out", kernel="reference")
    loaded = load_model(str(folder))
    ids = calibration_samples(loaded.tokenizer, "demo-calib", 4, 32, seed=0).input_ids
    model, records = compress_model(loaded.model, recipe.stages, ids)
    assert len(records) == 7 and len(model.model.layers) == 1 and model.config.num_attention_heads == 2
    assert records.structured == json.loads(
        (tmp_path / "out" / "report.json").read_text())["structured"]
    assert [p.config.method for p, _ in records.stages] == ["gptq"]
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(module.weight_packed, exported.get_submodule(name).weight_packed), name
