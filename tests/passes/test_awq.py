"""AWQ: the scale search, the fold, the clipping search, composition with GPTQ, the CLI and its checkpoint.

Tiny from-config Llamas check exactness (the fold keeps the logits; folding into a producer quantized
earlier in the block equals quantizing the folded rows); the embedded demo model checks that AWQ buys
quality over round-to-nearest on held-out text.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import compress
from compress.calibrate.data import calibration_samples, eval_windows
from compress.calibrate.stats import InputSampleStats
from compress.cli.main import app
from compress.core.errors import CompressError
from compress.core.primitives import compute_qparams, dequantize, quantize
from compress.core.scheme import QuantScheme
from compress.evaluate.metrics import compare_lm
from compress.kernels.quant_linear import QuantLinear
from compress.models.load import DEMO_MODEL_DIR, load_model
from compress.passes.quantize.awq import AWQConfig, _scale_quantized_rows_
from compress.passes.quantize.awq_math import fake_quantize, group_gram, search_clip, search_scale
from compress.pipeline.engine import compress_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import build_model, save_tiny, tiny_config  # noqa: E402

runner = CliRunner()
IDS = torch.randint(3, 100, (8, 32), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _llama(gqa: bool) -> nn.Module:
    if gqa:
        return build_model("llama")
    config = tiny_config("llama")
    config.num_key_value_heads = config.num_attention_heads  # V as wide as o_proj's input: v_proj folds too
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


# -- the math ---------------------------------------------------------------------------------------------


def _salient_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with a few loud channels feeding a layer: what AWQ exists for."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 20.0
    w = torch.randn(32, 64, generator=g)
    return x, w


def test_the_scale_search_protects_salient_channels_and_never_loses_to_rtn():
    x, w = _salient_layer()
    scheme = QuantScheme(bits=3, group_size=32)
    found = search_scale([w], [scheme], x, x.abs().mean(0), n_grid=20)
    rtn = float((x @ (fake_quantize(w, scheme) - w).t()).square().sum())
    assert found.losses[0] == pytest.approx(rtn, rel=1e-6)  # alpha 0 is plain RTN
    assert found.alpha > 0 and min(found.losses) < 0.9 * rtn
    assert found.scale[:4].min() > found.scale[4:].max()  # the loud channels get the larger scales
    assert (found.scale.max() * found.scale.min()).sqrt() == pytest.approx(1.0, rel=1e-5)


def test_the_clip_search_lowers_the_output_error_per_group():
    x, w = _salient_layer()
    w[:, 40] = 8.0  # an outlier weight stretching its group's range
    scheme = QuantScheme(bits=3, group_size=32)
    ratio = search_clip(w, scheme, group_gram(x, scheme), grid=20, max_shrink=0.5)
    assert ratio.shape == (32, 2) and ratio.max() <= 1.0 and ratio.min() >= 0.5
    err = float((x @ (fake_quantize(w, scheme, ratio) - w).t()).square().sum())
    assert err < float((x @ (fake_quantize(w, scheme) - w).t()).square().sum())
    assert (ratio < 1).any()


@pytest.mark.parametrize("symmetric", [True, False])
def test_candidates_are_quantized_with_the_exported_arithmetic(symmetric):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    scheme = QuantScheme(bits=4, group_size=32, symmetric=symmetric)
    ratio = torch.rand(16, 2, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.5
    scale, zero_point = compute_qparams(w, scheme, clip_ratio=ratio)
    expected = dequantize(quantize(w, scale, zero_point, scheme), scale, zero_point, scheme)
    assert torch.equal(fake_quantize(w, scheme, ratio), expected)


def test_the_input_sample_is_bounded_uniform_and_reproducible():
    batches = [torch.randn(3, 37, 16, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    stats, again = InputSampleStats(16, max_rows=50, seed=3), InputSampleStats(16, max_rows=50, seed=3)
    for b in batches:
        stats.add_batch(b)
        again.add_batch(b)
    everything = torch.cat([b.reshape(-1, 16) for b in batches])
    assert stats.tokens == everything.shape[0] and stats.rows.shape == (50, 16)
    assert torch.equal(stats.rows, again.rows)
    assert all((everything == row).all(1).any() for row in stats.rows)  # rows of the input, each kept whole
    positions = [int((everything == row).all(1).nonzero()[0]) for row in stats.rows]
    assert max(positions) > 400 and positions == sorted(positions)  # later batches replaced early rows
    torch.testing.assert_close(stats.mean_abs, everything.abs().mean(0))


def test_a_fold_into_a_packed_producer_equals_quantizing_the_folded_rows():
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    factor = torch.rand(8) * 3 + 0.2
    packed = QuantLinear.from_linear(linear, scheme)
    _scale_quantized_rows_(packed, (8, 16), factor, torch.float32)
    with torch.no_grad():
        linear.weight[8:16] *= factor[:, None]
        linear.bias[8:16] *= factor
    direct = QuantLinear.from_linear(linear, scheme)
    assert torch.equal(packed.weight_packed, direct.weight_packed)
    torch.testing.assert_close(packed.dequantized_weight(), direct.dequantized_weight(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(packed.bias, direct.bias)


# -- the pass on tiny models ------------------------------------------------------------------------------


@pytest.mark.parametrize("gqa", [True, False])
def test_the_fold_keeps_the_logits_before_quantization(gqa):
    model = _llama(gqa)
    before = _logits(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    compress_model(model, [{"method": "awq", "bits": 3, "group_size": 32, "quantize": False}], IDS)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])}
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert "model.layers.0.input_layernorm.weight" in changed and "model.layers.0.mlp.up_proj.weight" in changed
    assert ("model.layers.0.self_attn.o_proj.weight" in changed) == (not gqa)  # no producer under GQA
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)


def test_awq_quantizes_every_layer_and_folds_into_packed_producers():
    """Without GQA, o_proj's scale goes into v_proj and down_proj's into up_proj, both packed earlier in
    the block: the result must be what folding all scales first and quantizing after would give."""
    model = _llama(gqa=False)
    fp = _logits(model)
    _, records = compress_model(model, [{"method": "awq", "bits": 8, "group_size": 32}], IDS)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14 and len(records) == 14
    # 8 bits: the quantized model is close to fp only if the folds into packed producers were compensated
    torch.testing.assert_close(_logits(model), fp, rtol=0, atol=2e-2)


def test_groups_without_a_producer_are_quantized_and_logged_once(caplog):
    model = _llama(gqa=True)
    with caplog.at_level(logging.WARNING, logger="compress"):
        compress_model(model, [{"method": "awq", "bits": 4, "group_size": 32}], IDS)
    assert isinstance(model.get_submodule("model.layers.1.self_attn.o_proj"), QuantLinear)
    notes = [r.getMessage() for r in caplog.records if "awq" in r.getMessage()]
    assert len(notes) == 1 and "model.layers.0.self_attn.o_proj" in notes[0]


def test_no_producer_at_all_is_refused_in_one_sentence():
    stages = [{"method": "awq", "bits": 4, "group_size": 32, "ignore": ["lm_head", "re:.*(q|k|v|gate|up|down)_proj"]}]
    with pytest.raises(CompressError, match="no norm or linear producing the input of any targeted layer") as e:
        compress_model(_llama(gqa=True), stages, IDS)
    assert "\n" not in str(e.value) and "model.layers.0.self_attn.o_proj" in str(e.value)


def test_cli_refuses_awq_without_producers_exit_2_nothing_written(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "llama")
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(model_dir), "--method", "awq", "--bits", "4", "--group-size", "32",
                                 "--ignore", "lm_head", "--ignore", "re:.*(q|k|v|gate|up|down)_proj",
                                 "--num-samples", "2", "--seq-len", "16", "--no-eval", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "plain round-to-nearest" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_same_inputs_same_bytes():
    outputs = []
    for _ in range(2):
        model = _llama(gqa=False)
        compress_model(model, [{"method": "awq", "bits": 4, "group_size": 32, "max_tokens": 64}], IDS)
        outputs.append(model.state_dict())
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])


def test_awq_then_gptq_composes_and_the_reverse_is_refused(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "llama")
    stages = [{"method": "awq", "bits": 4, "group_size": 32, "quantize": False},
              {"method": "gptq", "bits": 4, "group_size": 32}]
    recipe = {"model": str(model_dir), "stages": stages, "eval": {"enabled": False},
              "calibration": {"dataset": "demo-calib", "num_samples": 4, "seq_len": 32}}
    compress.run(compress.Recipe(**recipe), tmp_path / "out")
    loaded = compress.load(tmp_path / "out", device="cpu")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    with pytest.raises(CompressError, match=r"stage 1 \(awq\) rewrites .*stage 0 \(gptq\) already quantized; .* so put awq before gptq$") as e:
        compress.run(compress.Recipe(**{**recipe, "stages": stages[::-1]}), tmp_path / "reverse")
    assert "\n" not in str(e.value) and not (tmp_path / "reverse").exists()
    with pytest.raises(CompressError, match=r"stage 1 \(gptq\) rewrites"):  # awq quantizing already is final
        compress.run(compress.Recipe(**{**recipe, "stages": [{**stages[0], "quantize": True}, stages[1]]}),
                     tmp_path / "twice")


def test_the_config_refuses_nonsense():
    with pytest.raises(ValueError):
        AWQConfig(n_grid=0)
    with pytest.raises(ValueError):
        AWQConfig(max_shrink=1.0)


# -- the demo model and the CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    loaded = load_model(str(DEMO_MODEL_DIR))
    calib = calibration_samples(loaded.tokenizer, "demo-calib", 16, 256, seed=0).input_ids
    windows = eval_windows(loaded.tokenizer, "demo-heldout", 256, max_windows=12)
    return loaded.model, calib, windows


def test_awq_beats_rtn_on_the_demo_model(demo):
    fp, calib, windows = demo
    kl = {}
    for method in ("rtn", "awq"):
        model = load_model(str(DEMO_MODEL_DIR)).model
        compress_model(model, [{"method": method, "bits": 3, "group_size": 128}], calib)
        kl[method] = compare_lm(model, fp, windows).kl
    assert kl["awq"] < 0.85 * kl["rtn"], kl


def test_cli_awq_checkpoint_loads_in_transformers_with_our_logits(tmp_path):
    from transformers.utils import logging as hf_logging

    out = tmp_path / "awq"
    result = runner.invoke(app, ["quantize", "--method", "awq", "--bits", "4", "--num-samples", "8", "--no-eval",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "awq" in (out / "recipe.yaml").read_text()
    ours = compress.load(out, device="cpu", kernel="reference")
    hf_logging.set_verbosity_error()
    theirs = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    for name, layer in ours.named_modules():
        if isinstance(layer, QuantLinear):
            weight = theirs.get_submodule(name).weight
            assert torch.equal(weight, layer.dequantized_weight(weight.dtype)), name
