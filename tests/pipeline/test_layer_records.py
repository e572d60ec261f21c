"""The sweep's per-layer records (no module attributes): what passes state, what the export, the manifest and
the card read from them, and a resumed run restoring them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import compress
from compress.calibrate.data import calibration_samples
from compress.core.scheme import QuantScheme
from compress.export.checkpoint import quantization_config
from compress.export.load import checkpoint_records
from compress.kernels.quant_linear import QuantLinear
from compress.models.load import load_model
from compress.pipeline.artifact import linear_names
from compress.pipeline.engine import compress_model
from compress.pipeline.output_dir import partial_dir
from compress.recipes.loader import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402

PRUNE = {"method": "sparsegpt", "pattern": "2:4"}
GPTQ_ACT_ORDER = {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "observer": "mse"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("records") / "llama")


def _ids(folder: Path) -> torch.Tensor:
    return calibration_samples(load_model(str(folder)).tokenizer, "demo-calib", 4, 32, seed=0).input_ids


def test_prune_then_gptq_records_every_fact(llama) -> None:
    model, records = compress_model(load_model(str(llama)).model, [PRUNE, GPTQ_ACT_ORDER], _ids(llama))
    assert len(records) == 28 and [r.methods for r in records[:2]] == [("sparsegpt",), ("sparsegpt",)]
    layers = records.layers
    assert len(layers) == 14 and list(layers) == list(dict.fromkeys(r.name for r in records))
    for name, record in layers.items():
        assert record.methods == ("sparsegpt", "gptq") and record.tags == ("sparsegpt-2of4", "w4g32")
        assert (record.sparsity, record.observer, record.actorder) == ("2:4", "mse", "weight"), name
        assert record.scheme == QuantScheme(4, 32) and record.format == "pack-quantized"
        assert record.rel_weight_error is not None and record.rel_weight_error > 0
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear)
        # GPTQ read the pruner's pattern from the record so far: the OBS update left the holes empty
        w = module.dequantized_weight(torch.float32)
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()), name
        assert not hasattr(module, "compress_sparsity") and not hasattr(module, "compress_observer")


@pytest.mark.parametrize(("stage", "want"), [
    ({"method": "rtn", "bits": 4, "group_size": 32}, {("minmax", None, None, True)}),
    ({"method": "gptq", "bits": 4, "group_size": 32, "observer": "mse", "act_order": False},
     {("mse", None, None, True)}),
    # the default: activation order, and per layer the observer auto kept (each is a stored observer)
    ({"method": "gptq", "bits": 4, "group_size": 32}, {("mse", "weight", None, True), ("minmax", "weight", None, True)}),
    ({"method": "gptq", "bits": 4, "group_size": -1, "act_order": True, "observer": "mse"},
     {("mse", None, None, True)}),  # per channel: the order changes nothing stored
    ({"method": "magnitude", "sparsity": 0.5}, {(None, None, "unstructured", False)}),
    ({"method": "sparsegpt", "pattern": "2:4", "bits": 4, "group_size": 32}, {("minmax", None, "2:4", True)}),
], ids=["rtn", "gptq-mse-natural", "gptq-default", "gptq-act-order-per-channel", "magnitude", "sparsegpt-joint"])
def test_each_pass_states_its_facts(llama, stage, want) -> None:
    _, records = compress_model(load_model(str(llama)).model, [stage], _ids(llama))
    facts = {(r.observer, r.actorder, r.sparsity, r.scheme is not None) for r in records.layers.values()}
    assert facts and facts <= want


@pytest.fixture(scope="module")
def exported(llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("records-run") / "out"
    recipe = recipe_from_dict({"model": str(llama), "eval": {"enabled": False},
                               "calibration": {"num_samples": 4, "seq_len": 32},
                               "stages": [PRUNE, GPTQ_ACT_ORDER]})
    compress.run(recipe, out)
    return out


def test_config_names_the_recorded_observer_and_act_order(exported) -> None:
    quant = json.loads((exported / "config.json").read_text())["quantization_config"]
    weights = [group["weights"] for group in quant["config_groups"].values()]
    assert weights and all(w["actorder"] == "weight" and w["observer"] == "mse" for w in weights)
    assert not quant["sparsity_config"]  # dense layout: the pattern is in the manifest and card, not for vLLM


def test_manifest_and_card_list_the_records(exported) -> None:
    manifest = json.loads((exported / "manifest.json").read_text())
    layers = manifest["layers"]
    assert len(layers) == 14 and layers[0]["name"] == "model.layers.0.self_attn.q_proj"
    for entry in layers:
        assert {k: v for k, v in entry.items() if k not in ("name", "rel_weight_error")} == {
            "methods": ["sparsegpt", "gptq"], "scheme": "int4 g32 sym", "observer": "mse", "actorder": "weight",
            "sparsity": "2:4"}
        assert entry["rel_weight_error"] == float(f"{entry['rel_weight_error']:.6g}") > 0
    report = json.loads((exported / "report.json").read_text())["layers"]
    assert len(report) == 28 and {e["method"] for e in report} == {"sparsegpt", "gptq"}
    card = (exported / "README.md").read_text()
    assert "| 0 | sparsegpt | sparsegpt-2of4 (14) | 14 |" in card and "| 1 | gptq | w4g32 (14) | 14 |" in card
    assert ("sparsity 2:4 (14 layers); scales chosen by mse (14 layers); columns solved in activation order "
            "(`actorder: weight`) in 14 layers") in card


def test_a_loaded_checkpoint_reexports_its_config_from_its_records(exported) -> None:
    """compress.load keeps no facts on modules: the records come from the checkpoint's config groups."""
    model = compress.load(exported, kernel="reference")
    quant = json.loads((exported / "config.json").read_text())["quantization_config"]
    records = checkpoint_records(model, quant)
    assert len(records) == 14 and {(r.observer, r.actorder) for r in records.values()} == {("mse", "weight")}
    assert quantization_config(model, linear_names(model), records=records) == quant
    assert quantization_config(model, linear_names(model)) != quant  # without records: min/max, no act-order


def test_resumed_prune_then_gptq_restores_the_records(llama, tmp_path) -> None:
    recipe = recipe_from_dict({"model": str(llama), "eval": {"enabled": False}, "stream": False,
                               "calibration": {"num_samples": 4, "seq_len": 32},
                               "stages": [PRUNE, GPTQ_ACT_ORDER]})
    compress.run(recipe, tmp_path / "straight")

    def stop_after_first_block(label: str, done: int, total: int) -> None:
        if label == "compress blocks" and done == 1:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        compress.run(recipe, out, resume=True, progress=stop_after_first_block)
    saved = json.loads((partial_dir(out) / "progress.json").read_text())["results"]
    assert {(r["sparsity"], r["observer"]) for r in saved} == {("2:4", None), (None, "mse")}
    compress.run(recipe, out, resume=True)
    for name in ("config.json", "manifest.json", "README.md", "report.json", "model.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    layers = json.loads((out / "manifest.json").read_text())["layers"]
    assert len(layers) == 14 and {entry["sparsity"] for entry in layers} == {"2:4"}


def test_convert_keeps_the_records(exported, tmp_path) -> None:
    """Conversion changes the layout, not the codes or how they were chosen: the manifest's per-layer list and
    the card's per-layer facts carry over."""
    from compress.export.convert import convert_checkpoint

    out = tmp_path / "gptq"
    out.mkdir()
    convert_checkpoint(exported, out, "gptq")
    source = json.loads((exported / "manifest.json").read_text())["layers"]
    assert json.loads((out / "manifest.json").read_text())["layers"] == source
    card = (out / "README.md").read_text()
    assert "| 1 | gptq | w4g32 (14) | 14 |" in card
    assert "sparsity 2:4 (14 layers); scales chosen by mse (14 layers)" in card
