"""W4A8 written by ``compress quantize --scheme w4a8``, read by transformers + compressed-tensors.

W4A8 is compressed-tensors' ``W4A8`` preset: int4 symmetric grouped weights stored ``pack-quantized`` (the W4A16
tensors) and int8 per-token dynamic input activations, which only the config group states. Both readers quantize
each layer's input per token at run time and multiply by the same dequantized int4 weight, so the logits agree
to float32 rounding (1e-5). To show transformers really quantizes the inputs (not W4A16), our logits with the
input quantization switched off must differ from theirs by far more than that.

With ``--lorc-rank`` (ZeroQuant-V2's LoRC, our EoRA compensation) the factors go to a PEFT adapter in lowrank/:
``compress.load`` applies them, transformers loads the plain W4A8 model and PEFT attaches the adapter (its
branch reads the unquantized input, as ours does), as ``tests/export/test_lowrank_export.py`` checks for W4A16.

The tiny llama's attention layers have 64 inputs, so the preset's 128-column groups fit only ``down_proj``:
``--indivisible per-channel`` quantizes the others per channel (still with int8 inputs), and the other folders
use groups of 32 (GPTQ) and per-channel weights (RTN).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import compressed_tensors  # noqa: F401  (a dev dependency: missing is a failure, never a skip)
import pytest
import torch
import yaml
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from peft import PeftModel
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.core.scheme import QuantScheme
from compress.export.adapter import ADAPTER_DIR, lowrank_modules
from compress.kernels import quant_linear
from compress.kernels.quant_linear import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny, write_rotated_corpus  # noqa: E402

runner = CliRunner()
TOL = 1e-5
RANK = 8
RUNS = {
    "gptq": ["--group-size", "32"],
    "rtn": ["--method", "rtn", "--group-size", "-1"],
    "g128": ["--indivisible", "per-channel"],
    "lorc": ["--group-size", "32", "--lorc-rank", str(RANK)],
}
FIELDS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("w4a8")
    model = save_tiny("llama", root / "llama")
    corpus = write_rotated_corpus(root / "calib.txt")
    out = {"corpus": corpus}
    for name, flags in RUNS.items():
        result = runner.invoke(app, ["quantize", str(model), "--scheme", "w4a8", *flags, "--dataset", str(corpus),
                                     "--num-samples", "4", "--seq-len", "32", "--no-eval",
                                     "--output", str(root / name), "--json"])
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _groups(folder: Path):
    data = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(data)
    return config, list(config.config_groups.values())


def test_config_is_the_packages_w4a8(folders):
    config, groups = _groups(folders["g128"])
    assert config.format == "pack-quantized"
    preset = PRESET_SCHEMES["W4A8"]
    assert {(g.weights.strategy, g.weights.group_size) for g in groups} == {("group", 128), ("channel", None)}
    for group in groups:  # every layer, per-channel fallback included, quantizes its inputs as the preset does
        for field in FIELDS:
            assert getattr(group.input_activations, field) == getattr(preset["input_activations"], field), field
    (grouped,) = [g for g in groups if g.weights.strategy == "group"]
    for field in FIELDS:
        assert getattr(grouped.weights, field) == getattr(preset["weights"], field), field
    assert QuantScheme.from_config_group(grouped.model_dump()) == QuantScheme.w4a8()


@pytest.mark.parametrize("name", ["gptq", "rtn", "g128"])
def test_transformers_logits_match_ours(folders, name, monkeypatch):
    hf_logging.set_verbosity_error()
    folder = folders[name]
    theirs = AutoModelForCausalLM.from_pretrained(str(folder))
    ours = compress.load(folder, device="cpu", kernel="reference")
    fast = compress.load(folder, device="cpu")  # kernel=auto: the int4 paths, inputs still quantized first
    layers = [m for m in ours.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.format == "pack-quantized" and m.scheme.input_activations is not None
                                     for m in layers)
    with torch.no_grad():
        t, o, f = theirs(_ids()).logits, ours(_ids()).logits, fast(_ids()).logits
        torch.testing.assert_close(t, o, rtol=0, atol=TOL)
        assert (f - o).abs().max() <= 2e-2 * o.abs().max()  # another matmul may move a token's int8 rounding
        monkeypatch.setattr(quant_linear, "fake_quantize_input", lambda x, args, scale=None: x)
        unquantized = ours(_ids()).logits
    assert (unquantized - t).abs().max() > 100 * TOL  # the reader does quantize activations


def test_eval_and_inspect_work(folders):
    folder = folders["gptq"]
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "pack-quantized"
    assert {layer["scheme"] for layer in report["layers"]} == {"w4g32a8d"}
    result = runner.invoke(app, ["eval", str(folder), "--dataset", str(folders["corpus"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ppl"] > 1


def test_lorc_loads_in_compress_and_through_peft(folders):
    """``--lorc-rank 8`` is ``--lowrank-compensate 8``: factors in lowrank/, applied by compress.load and PEFT."""
    hf_logging.set_verbosity_error()
    folder = folders["lorc"]
    recorded = yaml.safe_load((folder / "recipe.yaml").read_text())["stages"][0]
    assert recorded["method"] == "lowrank" and recorded["rank"] == RANK
    assert recorded["quantizer"]["activations"] == "int8-dynamic" and recorded["quantizer"]["bits"] == 4
    report = json.loads((folder / "report.json").read_text())
    assert {layer["scheme"] for layer in report["layers"]} == {"w4g32a8d"}
    assert all(layer["lowrank_rank"] == RANK for layer in report["layers"])
    ours = compress.load(folder, device="cpu", kernel="reference")
    modules = lowrank_modules(ours)
    assert len(modules) == 14 and all(m.lowrank_rank == RANK and m.scheme.input_activations is not None
                                      for m in modules.values())
    theirs = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        compensated = ours(_ids()).logits
        plain = theirs(_ids()).logits  # transformers serves the plain W4A8 model
        for module in modules.values():
            module.set_lowrank(None, None)
        torch.testing.assert_close(plain, ours(_ids()).logits, rtol=0, atol=TOL)
        attached = PeftModel.from_pretrained(theirs, str(folder / ADAPTER_DIR)).eval()
        torch.testing.assert_close(attached(_ids()).logits, compensated, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, compensated, atol=1e-3)  # the factors are what made them equal
