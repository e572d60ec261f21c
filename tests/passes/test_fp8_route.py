"""FP8 through the codes, the RTN pass, the recipe and the CLI: e4m3 saturating cast, scales, static input
calibration and the refusals (one sentence, exit 2, before anything loads)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from typer.testing import CliRunner

from compress.calibrate.stats import InputAbsMaxStats
from compress.cli.main import app
from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme
from compress.core.unpacked import FP8_MAX, fp8_round, stored_input_scale
from compress.kernels.fp8_act import fake_quantize_fp8
from compress.kernels.quant_linear import QuantLinear
from compress.passes.quantize.gptq import GPTQConfig
from compress.passes.quantize.rtn import RTNConfig, RTNPass
from compress.recipes.flags import recipe_from_flags
from compress.recipes.loader import load_recipe_data

runner = CliRunner()
FLOAT = dict(type="float", bits=8, group_size=-1)


def test_e4m3_cast_saturates_at_448_and_rounds_to_nearest():
    assert FP8_MAX == 448.0
    x = torch.tensor([1e6, -1e6, 448.0, 460.0, 0.0, 1.0625, 1.1875, 17.0])
    # beyond 448 clamps (never inf or NaN); 1.0625 is halfway between 1 and 1.125 (ties to even: 1.0),
    # 1.1875 halfway between 1.125 and 1.25 (ties to even: 1.25); 17 lies between 16 and 18 (ties to 16)
    assert fp8_round(x).tolist() == [448.0, -448.0, 448.0, 448.0, 0.0, 1.0, 1.25, 16.0]


def test_per_token_and_static_input_quantization():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [900.0, 3.0, -1.0]])
    dyn = fake_quantize_fp8(x, QuantScheme.w8a8_fp8().input_activations)
    assert torch.equal(dyn[1], torch.zeros(3))  # an all-zero token stays zero (eps scale, no NaN)
    assert dyn[0, 1] == -2.0 and dyn[2, 0] == 900.0  # each row's absmax maps to ±448 and back exactly
    args = QuantScheme.w8a8_fp8(static=True).input_activations
    scale = stored_input_scale(torch.tensor(100.0), torch.float32)
    assert torch.allclose(scale, torch.tensor([100.0 / 448]))
    static = fake_quantize_fp8(x, args, scale)
    assert static[2, 0] == pytest.approx(100.0, rel=1e-6)  # beyond the calibrated range: saturates
    with pytest.raises(CompressError, match="input_scale"):
        fake_quantize_fp8(x, args)


def test_config_validation():
    assert RTNConfig(**FLOAT).scheme == QuantScheme.fp8()
    assert RTNConfig(**FLOAT, activations="fp8-static").scheme == QuantScheme.w8a8_fp8(static=True)
    assert RTNConfig(**FLOAT).storage_format == "float-quantized"
    for bad, needle in [(dict(FLOAT, bits=4), "bits 8"), (dict(FLOAT, group_size=128), "per channel"),
                        (dict(FLOAT, observer="mse"), "min/max"), (dict(bits=8, group_size=-1,
                                                                        activations="fp8-dynamic"), "float weights"),
                        (dict(FLOAT, activations="int8-dynamic"), "int weights")]:
        with pytest.raises(ValidationError, match=needle):
            RTNConfig(**bad)
    with pytest.raises(ValidationError, match="integer grids only"):
        GPTQConfig(**FLOAT, observer="minmax")


@pytest.mark.parametrize("activations", ["none", "fp8-dynamic"])
def test_rtn_makes_float_quantized_layers(activations):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = RTNPass(RTNConfig(**FLOAT, activations=activations)).apply("l", linear)
    assert isinstance(layer, QuantLinear) and layer.format == "float-quantized"
    assert layer.weight.dtype == torch.float8_e4m3fn
    scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 448
    torch.testing.assert_close(layer.weight_scale.float(), scale)
    x = torch.randn(8, 64)
    assert (layer(x) - linear(x)).norm() / linear(x).norm() < 0.05


def test_static_inputs_are_calibrated_from_the_largest_input():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    rtn = RTNPass(RTNConfig(**FLOAT, activations="fp8-static"))
    assert rtn.needs_calibration
    stats = rtn.make_stats("l", linear)
    x = torch.randn(100, 64)
    x[3, 5] = 37.0
    stats.add_batch(x)
    layer = rtn.apply("l", linear, stats)
    assert float(layer.input_scale) == pytest.approx(37.0 / 448, rel=1e-6)
    with pytest.raises(CompressError, match="calibration inputs"):
        rtn.apply("l", linear, InputAbsMaxStats(64))


def test_presets():
    (stage,) = recipe_from_flags(load_recipe_data("fp8"), {}).stages
    assert stage.method == "rtn" and stage.scheme == QuantScheme.fp8()
    (stage,) = recipe_from_flags(load_recipe_data("w8a8-fp8"), {}).stages
    assert stage.scheme == QuantScheme.w8a8_fp8()


@pytest.mark.parametrize(("flags", "needle"), [
    (["--scheme", "w8a8-fp8", "--format", "gptq"], "the GPTQ layout can express"),
    (["--scheme", "fp8", "--bits", "4"], "8-bit symmetric per-channel"),
    (["--scheme", "fp8", "--static"], "w8a8-fp8 only"),
    (["--static"], "add --scheme w8a8-fp8"),
    (["--scheme", "fp8", "--method", "gptq"], "integer grids only"),
    (["--scheme", "fp8", "--observer", "mse"], "min/max"),
])
def test_cli_refusals_before_loading(flags, needle, tmp_path):
    result = runner.invoke(app, ["quantize", str(tmp_path / "no-such-model"), *flags, "--no-eval",
                                 "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_resolves_static(tmp_path):
    result = runner.invoke(app, ["quantize", "--scheme", "w8a8-fp8", "--static", "--dry-run", "--json",
                                 "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "fp8-static" in result.output
