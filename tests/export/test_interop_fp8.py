"""FP8 written by ``compress quantize --scheme fp8|w8a8-fp8 [--static]``, read by transformers + compressed-tensors.

Three checkpoints of one tiny Llama: W8A16-FP8 (e4m3 per-channel weights), W8A8-FP8 dynamic (e4m3 inputs per
token at run time, compressed-tensors' ``FP8_DYNAMIC``) and W8A8-FP8 static (one calibrated ``input_scale`` per
layer). The reader dequantizes the same e4m3 codes and, for W8A8, fake-quantizes each input with the same
``clamp(x / s, ±448) → e4m3 → · s`` in float32, so the logits agree to float32 rounding (1e-5). To show the
reader really quantizes the inputs, ours with that step switched off must differ from theirs by far more.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import compressed_tensors  # noqa: F401  (a dev dependency: missing is a failure, never a skip)
import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.kernels import quant_linear
from compress.kernels.quant_linear import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny, write_rotated_corpus  # noqa: E402

runner = CliRunner()
TOL = 1e-5
KINDS = {"fp8": ["--scheme", "fp8"], "dynamic": ["--scheme", "w8a8-fp8"],
         "static": ["--scheme", "w8a8-fp8", "--static"]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8")
    model = save_tiny("llama", root / "llama")
    corpus = write_rotated_corpus(root / "calib.txt")
    out: dict[str, Path] = {"corpus": corpus}
    for kind, flags in KINDS.items():
        result = runner.invoke(app, ["quantize", str(model), *flags, "--dataset", str(corpus), "--num-samples", "4",
                                     "--seq-len", "32", "--no-eval", "--output", str(root / kind), "--json"])
        assert result.exit_code == 0, result.output
        out[kind] = root / kind
    return out


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _group(folder: Path):
    data = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(data)
    assert config.format == "float-quantized"
    (scheme,) = config.config_groups.values()
    return scheme


def test_configs_are_the_packages_fp8_args(folders):
    fields = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")
    dynamic = _group(folders["dynamic"])
    for side in ("weights", "input_activations"):  # exactly compressed-tensors' FP8_DYNAMIC preset
        for field in fields:
            assert getattr(getattr(dynamic, side), field) == getattr(PRESET_SCHEMES["FP8_DYNAMIC"][side], field)
    static = _group(folders["static"]).input_activations  # the FP8 preset's static per-tensor inputs
    for field in fields:
        assert getattr(static, field) == getattr(PRESET_SCHEMES["FP8"]["input_activations"], field), field
    weight_only = _group(folders["fp8"])
    assert weight_only.input_activations is None and weight_only.weights.type == "float"


def test_stored_tensors(folders):
    with safe_open(str(folders["static"] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_proj.input_scale")
        ws = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
    assert w.dtype == torch.float8_e4m3fn and tuple(ws.shape) == (w.shape[0], 1)
    assert tuple(s.shape) == (1,) and s.dtype == torch.float32 and float(s) > 0
    assert float(w.float().abs().max()) <= 448
    with safe_open(str(folders["dynamic"] / "model.safetensors"), "pt") as f:
        assert not any(k.endswith("input_scale") for k in f.keys())  # dynamic: nothing calibrated
    assert sum(k.endswith("input_scale") for k in keys) == 14


@pytest.mark.parametrize("kind", list(KINDS))
def test_transformers_logits_match_ours(folders, kind, monkeypatch):
    folder = folders[kind]
    theirs = AutoModelForCausalLM.from_pretrained(str(folder))
    ours = compress.load(folder, device="cpu")
    layers = [m for m in ours.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.format == "float-quantized" for m in layers)
    with torch.no_grad():
        t, o = theirs(_ids()).logits, ours(_ids()).logits
        torch.testing.assert_close(t, o, rtol=0, atol=TOL)
        if kind == "fp8":
            return
        monkeypatch.setattr(quant_linear, "fake_quantize_input", lambda x, *args: x)
        unquantized = ours(_ids()).logits
    assert (unquantized - t).abs().max() > 100 * TOL  # the reader does quantize the inputs


def test_eval_and_inspect_know_the_schemes(folders):
    tags = {"fp8": "wfp8", "dynamic": "wfp8afp8d", "static": "wfp8afp8t"}
    for kind, tag in tags.items():
        result = runner.invoke(app, ["inspect", str(folders[kind]), "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["format"] == "float-quantized"
        assert {layer["scheme"] for layer in report["layers"]} == {tag}
    result = runner.invoke(app, ["eval", str(folders["static"]), "--dataset", str(folders["corpus"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ppl"] > 1
