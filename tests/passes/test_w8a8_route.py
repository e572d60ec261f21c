"""W8A8-int8 through the passes, the recipe and the CLI: RTN and GPTQ weights, int-quantized layers, refusals."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from typer.testing import CliRunner

from compress.calibrate.stats import HessianStats
from compress.cli.main import app
from compress.core.scheme import QuantScheme
from compress.kernels.quant_linear import QuantLinear
from compress.passes.quantize.gptq import GPTQConfig, GPTQPass
from compress.passes.quantize.rtn import RTNConfig, RTNPass
from compress.recipes.flags import recipe_from_flags
from compress.recipes.loader import load_recipe_data

runner = CliRunner()
W8A8 = dict(bits=8, group_size=-1, activations="int8-dynamic")


def test_config_scheme_and_validation():
    cfg = RTNConfig(**W8A8)
    assert cfg.scheme == QuantScheme.w8a8_int8() and cfg.storage_format == "int-quantized"
    assert RTNConfig(bits=8, group_size=-1).scheme.input_activations is None
    assert RTNConfig(**dict(W8A8, bits=4)).scheme == QuantScheme.w4a8(-1)  # 4-bit weights: W4A8 (test_w4a8_route)
    for bad in (dict(W8A8, bits=3), dict(W8A8, group_size=128), dict(W8A8, symmetric=False)):
        with pytest.raises(ValidationError, match="8-bit per channel"):
            RTNConfig(**bad)


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_rtn_makes_int_quantized_w8a8(observer):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = RTNPass(RTNConfig(**W8A8, observer=observer)).apply("l", linear)
    assert isinstance(layer, QuantLinear) and layer.format == "int-quantized"
    assert layer.scheme == QuantScheme.w8a8_int8() and layer.weight.dtype == torch.int8
    x = torch.randn(8, 64)
    rel = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert rel < 0.02


def test_gptq_makes_int_quantized_w8a8_from_its_own_codes():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    stats = HessianStats(64)
    stats.add_batch(torch.randn(512, 64))
    layer = GPTQPass(GPTQConfig(**W8A8)).apply("l", linear, stats)
    assert layer.format == "int-quantized" and layer.scheme == QuantScheme.w8a8_int8()
    weight_only = GPTQPass(GPTQConfig(bits=8, group_size=-1)).apply("l", linear, stats)
    assert torch.equal(layer.dequantized_weight(), weight_only.dequantized_weight())


def test_preset_is_gptq_w8a8():
    recipe = recipe_from_flags(load_recipe_data("w8a8-int8"), {})
    (stage,) = recipe.stages
    assert stage.method == "gptq" and stage.scheme == QuantScheme.w8a8_int8()


@pytest.mark.parametrize(("flags", "needle"), [
    (["--format", "gptq"], "the GPTQ layout can express"),
    (["--bits", "4"], "8-bit symmetric per-channel"),
    (["--group-size", "128"], "8-bit symmetric per-channel"),
    (["--asym"], "8-bit symmetric per-channel"),
    (["--scheme", "w4a4"], "unknown --scheme"),
])
def test_cli_refusals_before_loading(flags, needle, tmp_path):
    args = ["quantize", str(tmp_path / "no-such-model")]
    if "--scheme" not in flags:
        args += ["--scheme", "w8a8-int8"]
    result = runner.invoke(app, [*args, *flags, "--no-eval", "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert needle in result.output


def test_cli_dry_run_resolves_the_scheme(tmp_path):
    result = runner.invoke(app, ["quantize", "--scheme", "w8a8-int8", "--method", "rtn", "--dry-run", "--json",
                                 "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "int8-dynamic" in result.output
