"""W4A8 through the scheme, the passes, the codecs, the recipe and the CLI: int4 grouped weights stored
pack-quantized, inputs int8 per token at run time, ``--lorc-rank`` as the low-rank compensation alias, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from pydantic import ValidationError
from torch import nn
from typer.testing import CliRunner

from compress.calibrate.stats import HessianStats
from compress.cli.main import app
from compress.codecs import CODECS
from compress.core.errors import CompressError
from compress.core.qargs import QuantArgs
from compress.core.scheme import SCHEMES, QuantScheme
from compress.kernels.int8_act import fake_quantize_input
from compress.kernels.quant_linear import QuantLinear
from compress.passes.quantize.gptq import GPTQConfig, GPTQPass
from compress.passes.quantize.rtn import RTNConfig, RTNPass
from compress.recipes.flags import recipe_from_flags
from compress.recipes.loader import load_recipe_data

runner = CliRunner()
W4A8 = dict(bits=4, group_size=128, activations="int8-dynamic")
FIELDS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")


def test_scheme_is_the_packages_w4a8():
    scheme = SCHEMES["w4a8"]()
    assert scheme == QuantScheme.w4a8() and scheme.tag == "w4g128a8d"
    group = scheme.to_config_group(["Linear"], observer="minmax")
    for side in ("weights", "input_activations"):
        for field in FIELDS:
            assert group[side][field] == getattr(PRESET_SCHEMES["W4A8"][side], field), (side, field)
    assert QuantScheme.from_config_group(group) == scheme


def test_config_scheme_storage_and_validation():
    cfg = RTNConfig(**W4A8)
    assert cfg.scheme == QuantScheme.w4a8() and cfg.storage_format == "pack-quantized"
    assert RTNConfig(**dict(W4A8, group_size=-1)).scheme == QuantScheme.w4a8(-1)
    assert RTNConfig(bits=4, group_size=128).scheme.input_activations is None
    # a layer the groups do not fit falls back to per-channel weights and keeps its int8 inputs
    fallback = RTNConfig(**W4A8, indivisible="per-channel").scheme_for(64)
    assert fallback == QuantScheme.w4a8(-1)
    for bad in (dict(W4A8, bits=3), dict(W4A8, bits=8), dict(W4A8, symmetric=False)):
        with pytest.raises(ValidationError, match="int8-dynamic activations need symmetric weights"):
            RTNConfig(**bad)


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_rtn_makes_pack_quantized_w4a8_that_quantizes_its_input(observer):
    torch.manual_seed(0)
    linear = nn.Linear(256, 32)
    layer = RTNPass(RTNConfig(**W4A8, observer=observer)).apply("l", linear)
    weight_only = RTNPass(RTNConfig(bits=4, group_size=128, observer=observer)).apply("l", linear)
    assert isinstance(layer, QuantLinear) and layer.format == "pack-quantized"
    assert layer.scheme == QuantScheme.w4a8() and layer.weight_packed.dtype == torch.int32
    assert torch.equal(layer.weight_packed, weight_only.weight_packed)  # the same int4 codes as W4A16
    x = torch.randn(8, 256)
    with torch.no_grad():
        expected = weight_only(fake_quantize_input(x, QuantArgs.int8_per_token()))
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
        assert not torch.allclose(layer(x), weight_only(x), atol=1e-4)  # the input really is quantized


def test_gptq_makes_pack_quantized_w4a8_from_its_own_codes():
    torch.manual_seed(0)
    linear = nn.Linear(256, 32)
    stats = HessianStats(256)
    stats.add_batch(torch.randn(2048, 256))
    layer = GPTQPass(GPTQConfig(**W4A8)).apply("l", linear, stats)
    assert layer.format == "pack-quantized" and layer.scheme == QuantScheme.w4a8()
    weight_only = GPTQPass(GPTQConfig(bits=4, group_size=128)).apply("l", linear, stats)
    assert torch.equal(layer.dequantized_weight(), weight_only.dequantized_weight())


def test_codecs_pack_w4a8_and_gptq_refuses_it():
    CODECS.get("pack-quantized").check(QuantScheme.w4a8())
    fp8_inputs = QuantScheme(weights=QuantArgs.int_weights(4, 128), input_activations=QuantArgs.fp8_per_token())
    with pytest.raises(CompressError, match="int8 per token"):
        CODECS.get("pack-quantized").check(fp8_inputs)
    with pytest.raises(CompressError, match="weight-only"):
        CODECS.get("gptq").check(QuantScheme.w4a8())
    group = CODECS.get("pack-quantized").config(QuantScheme.w4a8())
    assert group["format"] == "pack-quantized"  # readers infer int-quantized for int weights with inputs
    assert "format" not in CODECS.get("pack-quantized").config(QuantScheme(4, 128))


def test_preset_is_gptq_w4a8():
    recipe = recipe_from_flags(load_recipe_data("w4a8"), {})
    (stage,) = recipe.stages
    assert stage.method == "gptq" and stage.scheme == QuantScheme.w4a8() and stage.act_order


def _refused(tmp_path, flags: list[str]) -> str:
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(tmp_path / "no-such-model"), *flags, "--no-eval",
                                 "--output", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize(("flags", "needle"), [
    (["--format", "gptq"], "the GPTQ layout can express"),
    (["--bits", "8"], "4-bit symmetric weights"),
    (["--bits", "3"], "4-bit symmetric weights"),
    (["--asym"], "4-bit symmetric weights"),
    (["--lorc-rank", "0"], "--lorc-rank must be a positive rank, got 0"),
    (["--lorc-rank", "-3"], "--lorc-rank must be a positive rank, got -3"),
    (["--lorc-rank", "4", "--lowrank-compensate", "8"], "different ranks"),
])
def test_cli_refusals_before_loading(flags, needle, tmp_path):
    """One sentence, exit 2, nothing written, and before the (missing) model is looked for."""
    assert needle in _refused(tmp_path, ["--scheme", "w4a8", *flags])


def test_lorc_rank_refusals_need_no_scheme(tmp_path):
    assert "--lorc-rank must be a positive rank" in _refused(tmp_path, ["--lorc-rank", "0"])


def _dry_stages(tmp_path, flags: list[str]) -> list[dict]:
    result = runner.invoke(app, ["quantize", *flags, "--dry-run", "--json", "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["recipe"]["stages"]


def test_cli_dry_run_resolves_the_scheme(tmp_path):
    (stage,) = _dry_stages(tmp_path, ["--scheme", "w4a8"])
    assert (stage["method"], stage["bits"], stage["group_size"], stage["activations"]) == \
        ("gptq", 4, 128, "int8-dynamic")
    # --group-size is free (per channel too); --method rtn takes the preset's fields rtn has, with rtn's values
    (stage,) = _dry_stages(tmp_path, ["--scheme", "w4a8", "--group-size", "-1", "--method", "rtn"])
    assert (stage["method"], stage["bits"], stage["group_size"], stage["observer"]) == ("rtn", 4, -1, "minmax")


@pytest.mark.parametrize("flags", [["--lorc-rank", "8"], ["--lowrank-compensate", "8"],
                                   ["--lorc-rank", "8", "--lowrank-compensate", "8"]])
def test_lorc_rank_is_lowrank_compensation(flags, tmp_path):
    (stage,) = _dry_stages(tmp_path, ["--scheme", "w4a8", *flags])
    assert stage["method"] == "lowrank" and stage["rank"] == 8
    assert stage["quantizer"]["activations"] == "int8-dynamic" and stage["quantizer"]["bits"] == 4
