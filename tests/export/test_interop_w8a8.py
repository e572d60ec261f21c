"""W8A8-int8 written by ``compress quantize --scheme w8a8-int8``, read by transformers + compressed-tensors.

Both sides quantize each layer's input per token at run time (absmax / 127.5, round, clamp to int8) and
multiply by the same dequantized int8 weight in float32, so the logits agree to float32 rounding: we assert
1e-5 (identical on this machine). The ``torch._int_mm`` path is held to 2% of the largest logit end to end
(why: see the test). To show the reader really quantizes activations (not W8A16), our logits with the input quantization
switched off must differ from theirs by much more than that.
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
FAST_TOL = 2e-2


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("w8a8")
    model = save_tiny("llama", root / "llama")
    corpus = root / "calib.txt"
    write_rotated_corpus(corpus)
    out = {}
    for method in ("gptq", "rtn"):
        result = runner.invoke(app, ["quantize", str(model), "--scheme", "w8a8-int8", "--method", method,
                                     "--dataset", str(corpus), "--num-samples", "4", "--seq-len", "32",
                                     "--no-eval", "--output", str(root / method), "--json"])
        assert result.exit_code == 0, result.output
        out[method] = root / method
    out["corpus"] = corpus
    return out


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_config_is_the_packages_w8a8(folders, method):
    data = json.loads((folders[method] / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(data)
    assert config.format == "int-quantized"
    (scheme,) = config.config_groups.values()
    for side in ("weights", "input_activations"):
        mine, preset = getattr(scheme, side), PRESET_SCHEMES["W8A8"][side]
        for field in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic"):
            assert getattr(mine, field) == getattr(preset, field), (side, field)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_transformers_logits_match_ours(folders, method, monkeypatch):
    folder = folders[method]
    theirs = AutoModelForCausalLM.from_pretrained(str(folder))
    ours = compress.load(folder, device="cpu", kernel="reference")
    fast = compress.load(folder, device="cpu", kernel="int8")
    layers = [m for m in ours.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.format == "int-quantized" for m in layers)
    with torch.no_grad():
        t, o, f = theirs(_ids()).logits, ours(_ids()).logits, fast(_ids()).logits
        torch.testing.assert_close(t, o, rtol=0, atol=TOL)
        # the _int_mm path agrees per layer to float32 rounding (tests/kernels/test_int8_act.py), but through
        # the model such a last-bit difference can move a later layer's activation across a rounding boundary
        # (one int8 code off by one, a 1/255 step of that token's range): a looser end-to-end bound
        assert (f - o).abs().max() <= FAST_TOL * o.abs().max()
        monkeypatch.setattr(quant_linear, "fake_quantize_input", lambda x, args: x)
        unquantized = ours(_ids()).logits
    assert (unquantized - t).abs().max() > 100 * TOL  # the reader does quantize activations


def test_eval_and_inspect_work(folders):
    folder = folders["gptq"]
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "int-quantized"
    assert {layer["scheme"] for layer in report["layers"]} == {"w8a8d"}
    result = runner.invoke(app, ["eval", str(folder), "--dataset", str(folders["corpus"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ppl"] > 1
