"""SmoothQuant: the scale and its guards, the fold (exact before quantization), what it buys under W8A8 on
outlier channels, the alpha search, stage order and records, the CLI and the checkpoint it writes.

Exactness runs on tiny from-config llama, qwen2 and opt models (opt: LayerNorm weight and bias, and fc1 → fc2
through the ReLU); the W8A8 gain runs on a layer, and on a tiny llama, with injected outlier input channels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import compress
from compress.calibrate.data import calibration_samples
from compress.calibrate.stats import InputAbsMaxStats
from compress.cli.main import app
from compress.codecs import quantize_linear
from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme
from compress.kernels.quant_linear import QuantLinear
from compress.models.load import load_model
from compress.passes.quantize.smoothquant import SmoothQuantConfig
from compress.passes.quantize.smoothquant_math import (
    SCALE_MAX,
    SCALE_MIN,
    search_alpha,
    smooth_scale,
    w8a8_error,
)
from compress.pipeline.engine import compress_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import build_model, save_tiny, write_rotated_corpus  # noqa: E402

runner = CliRunner()
IDS = torch.randint(3, 100, (8, 32), generator=torch.Generator().manual_seed(0))
W8A8_RTN = {"method": "rtn", "bits": 8, "group_size": -1, "activations": "int8-dynamic"}
W8A8_GPTQ = {"method": "gptq", "bits": 8, "group_size": -1, "activations": "int8-dynamic", "observer": "minmax"}


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _inject_outliers(model: nn.Module, channels=(3, 17, 40), factor: float = 30.0) -> nn.Module:
    """Function-preserving: each llama norm's output channel ``c`` times ``factor``, its readers' column ``c``
    divided by it; the activations entering q/k/v and gate/up get outlier channels."""
    idx = torch.tensor(channels)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, readers in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                  (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[idx] *= factor
                owner = layer.self_attn if readers[0] == "q_proj" else layer.mlp
                for name in readers:
                    getattr(owner, name).weight[:, idx] /= factor
    return model


# -- the math ---------------------------------------------------------------------------------------------


def test_the_scale_is_the_papers_formula_with_guards_and_clamps():
    w1 = torch.tensor([[1.0, -4.0, 0.0, 2.0, 1.0], [0.5, 1.0, 0.0, -8.0, 1.0]])
    w2 = torch.tensor([[2.0, 1.0, 0.0, 1.0, 1.0]])
    x_max = torch.tensor([16.0, 9.0, 5.0, 0.0, 1e-30])
    s = smooth_scale(x_max, [w1, w2], 0.5)
    # max over every reader's rows: column maxima 2, 4, 0, 8, 1
    assert s[0] == pytest.approx(16 ** 0.5 / 2 ** 0.5) and s[1] == pytest.approx(3 / 2)
    assert s[2] == 1.0 and s[3] == 1.0  # zero weight column, zero input channel: no scale
    assert s[4] == SCALE_MIN  # 1e-15 clamped
    assert smooth_scale(torch.tensor([1e30]), [torch.tensor([[1.0]])], 1.0)[0] == SCALE_MAX
    assert torch.equal(smooth_scale(x_max, [w1], 1.0)[:3], torch.tensor([16.0, 9.0, 1.0]))  # alpha 1: max|X|
    with pytest.raises(CompressError):
        smooth_scale(x_max, [w1], 1.5)


def test_abs_max_stats_track_every_token_and_keep_a_sample_only_when_asked():
    batches = [torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    everything = torch.cat([b.reshape(-1, 8) for b in batches])
    plain, sampled = InputAbsMaxStats(8), InputAbsMaxStats(8, max_rows=10, seed=1)
    for b in batches:
        plain.add_batch(b)
        sampled.add_batch(b)
    assert torch.equal(plain.abs_max, everything.abs().amax(0)) and plain.tokens == 72
    assert plain.rows.shape == (0, 8) and sampled.rows.shape == (10, 8)
    assert plain.share_key() != sampled.share_key()
    plain.free()
    with pytest.raises(CompressError):
        _ = plain.abs_max


def _outlier_layer() -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 64, generator=g)
    x[:, [3, 17, 40]] *= 40.0  # fixed outlier channels, as LLM activations have
    layer = nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
    return layer, x


def _shipped_error(layer: nn.Linear, x: torch.Tensor, scale: torch.Tensor | None) -> float:
    """The W8A8 output error of the layer as it ships: QuantLinear (int8 per-channel weights, its own
    per-token int8 input quantization) of the smoothed weight, fed the smoothed input."""
    smoothed = nn.Linear(layer.in_features, layer.out_features, bias=False)
    s = torch.ones(layer.in_features) if scale is None else scale
    with torch.no_grad():
        smoothed.weight.copy_(layer.weight * s)
        quantized = quantize_linear(smoothed, QuantScheme.w8a8_int8(), format="int-quantized")
        return float((quantized(x / s) - layer(x)).square().sum())


def test_smoothing_lowers_the_w8a8_error_on_outlier_channels():
    layer, x = _outlier_layer()
    s = smooth_scale(x.abs().amax(0), [layer.weight], 0.5)
    plain, smoothed = _shipped_error(layer, x, None), _shipped_error(layer, x, s)
    assert smoothed < 0.5 * plain, (smoothed, plain)
    # the search scores what ships: its error formula is the QuantLinear's, to float rounding
    assert w8a8_error([layer.weight], x, s) == pytest.approx(smoothed, rel=1e-3)
    assert w8a8_error([layer.weight], x) == pytest.approx(plain, rel=1e-3)


def test_auto_is_no_worse_than_half_nor_than_not_smoothing():
    layer, x = _outlier_layer()
    other = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))  # a second reader of x
    found = search_alpha([layer.weight, other], x, x.abs().amax(0), points=20)
    assert None in found.losses and 0.5 in found.losses and len(found.losses) == 22
    best = min(found.losses.values())
    assert found.losses[found.alpha] == best and best <= found.losses[0.5] and best < found.losses[None]
    half = smooth_scale(x.abs().amax(0), [layer.weight, other], 0.5)
    assert w8a8_error([layer.weight, other], x, found.scale) <= w8a8_error([layer.weight, other], x, half)
    quiet = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    assert search_alpha([layer.weight], quiet, quiet.abs().amax(0)).losses[None] > 0


# -- the pass on tiny models ------------------------------------------------------------------------------


@pytest.mark.parametrize("family,alpha", [("llama", 0.5), ("llama", "auto"), ("qwen2", 0.5), ("opt", 0.5)])
def test_the_smoothing_alone_keeps_the_logits(family, alpha):
    model = build_model(family)
    if family == "llama":
        _inject_outliers(model)
    if family == "opt":  # a LayerNorm bias starts at zero: give it values, so that scaling it shows
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    before = _logits(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _, records = compress_model(model, [{"method": "smoothquant", "alpha": alpha}], IDS)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])}
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    prefix = "model.decoder.layers.0." if family == "opt" else "model.layers.0."
    norm = "self_attn_layer_norm" if family == "opt" else "input_layernorm"
    assert {f"{prefix}{norm}.weight", f"{prefix}self_attn.q_proj.weight"} <= changed
    if family == "opt":  # LayerNorm bias scaled too, and fc1's rows for fc2 (through the ReLU)
        assert {f"{prefix}{norm}.bias", f"{prefix}fc1.weight", f"{prefix}fc2.weight"} <= changed
    assert {r.methods for r in records.layers.values()} == {("smoothquant",)}
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)


def test_smoothquant_lowers_the_w8a8_error_of_a_model_with_outliers(caplog):
    fp = _inject_outliers(build_model("llama"))
    reference = _logits(fp)
    err = {}
    for name, stages in (("plain", [W8A8_RTN]), ("smoothed", [{"method": "smoothquant", "alpha": 0.5}, W8A8_RTN])):
        model = _inject_outliers(build_model("llama"))
        with caplog.at_level("INFO", logger="compress"):
            _, records = compress_model(model, stages, IDS)
        err[name] = float((_logits(model) - reference).square().mean())
    assert err["smoothed"] < 0.5 * err["plain"], err
    record = records.layers["model.layers.1.mlp.gate_proj"]
    assert record.methods == ("smoothquant", "rtn") and record.tags == ("sq0.5", "w8a8d")
    assert record.scheme == QuantScheme.w8a8_int8() and record.format == "int-quantized"
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("smoothquant")]
    assert len(notes) == 1 and "model.layers.0.self_attn.o_proj" in notes[0]  # GQA: o_proj has no producer


def test_smoothquant_after_the_quantizer_is_refused_by_the_stage_order():
    with pytest.raises(CompressError, match=r"stage 1 \(smoothquant\) rewrites .* put smoothquant before gptq$"):
        compress_model(build_model("llama"), [W8A8_GPTQ, {"method": "smoothquant"}], IDS)


def test_same_inputs_same_bytes():
    outputs = []
    for _ in range(2):
        model = _inject_outliers(build_model("llama"))
        compress_model(model, [{"method": "smoothquant", "alpha": "auto", "max_tokens": 64}, W8A8_RTN], IDS)
        outputs.append(model.state_dict())
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])


@pytest.mark.parametrize("alpha", [1.5, -0.1, "half", True])
def test_the_config_refuses_nonsense(alpha):
    with pytest.raises(ValueError, match="alpha must be a number in"):
        SmoothQuantConfig(alpha=alpha)
    assert SmoothQuantConfig(alpha="AUTO").alpha == "auto" and SmoothQuantConfig(alpha=1).alpha == 1.0


# -- the CLI and its checkpoint ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoothquant")
    model_dir = save_tiny("llama", root / "llama")
    corpus = write_rotated_corpus(root / "calib.txt")
    out = root / "out"
    result = runner.invoke(app, ["quantize", str(model_dir), "--scheme", "w8a8-int8", "--smoothquant", "0.5",
                                 "--dataset", str(corpus), "--num-samples", "4", "--seq-len", "32", "--no-eval",
                                 "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return model_dir, corpus, out


def test_the_cli_export_loads_with_the_in_memory_logits(exported):
    model_dir, corpus, out = exported
    recipe = compress.Recipe(**yaml.safe_load((out / "recipe.yaml").read_text()))
    assert [s.method for s in recipe.stages] == ["smoothquant", "gptq"] and recipe.stages[0].alpha == 0.5
    loaded = load_model(str(model_dir))
    calib = calibration_samples(loaded.tokenizer, str(corpus), 4, 32, seed=recipe.calibration.seed).input_ids
    in_memory, _ = compress_model(loaded.model, recipe.stages, calib,
                                  true_sequential=recipe.calibration.true_sequential)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    ours = compress.load(out, device="cpu", kernel="reference")
    torch.testing.assert_close(_logits(ours, ids), _logits(in_memory, ids), rtol=0, atol=1e-6)
    layers = json.loads((out / "manifest.json").read_text())["layers"]
    assert len(layers) == 14 and all(layer["methods"] == ["smoothquant", "gptq"] for layer in layers)


def test_transformers_with_compressed_tensors_reads_the_smoothed_checkpoint(exported):
    from transformers.utils import logging as hf_logging

    _, _, out = exported
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    hf_logging.set_verbosity_error()
    theirs = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ours = compress.load(out, device="cpu", kernel="reference")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), rtol=0, atol=1e-5)


def _refused(result, out: Path, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("args,words", [
    (["--scheme", "w8a8-int8", "--smoothquant", "1.5"], ("--smoothquant", "[0, 1] or auto", "'1.5'")),
    (["--smoothquant", "0.5"], ("--smoothquant", "needs --scheme w8a8-int8")),
    (["--smoothquant", "0.5", "--method", "rtn", "--bits", "8", "--group-size", "-1"], ("needs --scheme w8a8-int8",)),
    (["--scheme", "w8a8-int8", "--method", "smoothquant"], ("smoothquant is not a quantization method",)),
])
def test_cli_bad_input_exit_2_nothing_written(tmp_path, args, words):
    out = tmp_path / "out"
    _refused(runner.invoke(app, ["quantize", *args, "--output", str(out)]), out, *words)


def test_a_recipe_with_smoothquant_after_the_quantizer_exits_2(tmp_path):
    recipe = tmp_path / "late.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [W8A8_RTN, {"method": "smoothquant", "alpha": 0.5}]}))
    out = tmp_path / "out"
    _refused(runner.invoke(app, ["run", str(recipe), "--output", str(out)]), out,
             "stage 1 (smoothquant)", "put smoothquant before rtn")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"method": "smoothquant", "alpha": 1.5}, W8A8_RTN]}))
    _refused(runner.invoke(app, ["run", str(bad), "--output", str(out)]), out, "alpha")


def test_the_preset_and_flags_keep_the_smoothing_stage():
    result = runner.invoke(app, ["quantize", "--recipe", "w8a8-int8-smoothquant", "--method", "rtn",
                                 "--smoothquant", "auto", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    stages = json.loads(result.stdout)["recipe"]["stages"]
    assert [s["method"] for s in stages] == ["smoothquant", "rtn"] and stages[0]["alpha"] == "auto"
    assert stages[1]["activations"] == "int8-dynamic"
