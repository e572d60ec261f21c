"""HQQ: the half-quadratic solve beats min/max on the weight error, ships integer zero points and stored scales
that reproduce what was scored, needs no calibration data, and its checkpoint loads in our reader, in the
compressed-tensors package and in transformers with our logits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

import compress
from compress.core.primitives import compute_qparams, dequantize, quantize
from compress.core.scheme import QuantScheme
from compress.kernels.quant_linear import QuantLinear
from compress.models.load import load_model
from compress.passes.base import PASSES
from compress.passes.quantize.hqq import HQQConfig, HQQPass
from compress.passes.quantize.hqq_math import hqq_qparams, shrink_lp
from compress.pipeline.engine import compress_model, needs_calibration
from compress.recipes.loader import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402


def _heavy(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Student-t(3) weights at an LLM-like magnitude: the tails that make min/max waste its grid."""
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(3, rows, cols, generator=g).square().sum(0)
    return torch.randn(rows, cols, generator=g) / (chi2 / 3).sqrt() * 0.02


def _errors(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, scheme: QuantScheme) -> tuple[float, float]:
    """(L2, l0.7) error of the weight a reader reconstructs from these qparams."""
    e = w - dequantize(quantize(w, scale, zp, scheme), scale, zp, scheme)
    return float(e.square().sum()), float(e.abs().pow(0.7).sum())


# -- the math ---------------------------------------------------------------------------------------------


def test_shrink_is_the_generalized_soft_threshold():
    x = torch.tensor([0.0, 0.05, -0.05, 2.0, -3.0])
    out = shrink_lp(x, beta=1.0, p=0.7)
    assert out[0] == 0 and out[1] == 0 and out[2] == 0  # small errors count as fitted
    torch.testing.assert_close(out[3:], torch.sign(x[3:]) * (x[3:].abs() - x[3:].abs().pow(-0.3)))
    torch.testing.assert_close(shrink_lp(x, beta=2.0, p=1.0), torch.sign(x) * (x.abs() - 0.5).clamp_min(0))
    u = torch.randn(7, 3, 40, generator=torch.Generator().manual_seed(0))  # the loop's [rows, groups, group]
    for beta, p in ((1.0, 0.7), (2.5, 0.7), (0.3, 0.5)):
        dense = torch.sign(u) * (u.abs() - u.abs().pow(p - 1) / beta).clamp_min(0)
        torch.testing.assert_close(shrink_lp(u, beta, p), dense)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_hqq_beats_min_max_on_heavy_tails_in_lp_and_l2(bits, symmetric):
    w = _heavy(seed=bits)
    scheme = QuantScheme(bits=bits, group_size=64, symmetric=symmetric)
    rtn = _errors(w, *compute_qparams(w, scheme), scheme)
    result = hqq_qparams(w, scheme)
    hqq = _errors(w, result.scale, result.zero_point, scheme)
    # measured (asym/sym): W4 L2 0.94/0.89, lp 0.97/0.95; W3 L2 0.87/0.78, lp 0.93/0.88 of min/max's
    assert hqq[0] < 0.98 * rtn[0] and hqq[1] < 0.99 * rtn[1], (hqq, rtn)


@pytest.mark.parametrize(("mode", "criterion", "power"), [("round-refit", "l2", 2.0), ("integer", "l2", 2.0),
                                                          ("round-refit", "lp", 0.7), ("round-refit", "l1", 1.0)])
def test_never_worse_than_min_max_per_group_and_zero_points_integer(mode, criterion, power):
    w = _heavy(seed=7)
    scheme = QuantScheme(bits=3, group_size=32, symmetric=False)
    result = hqq_qparams(w, scheme, zero_point=mode, criterion=criterion)
    assert result.zero_point.dtype == torch.int32 and result.scale.dtype == torch.float32
    assert int(result.zero_point.min()) >= scheme.qmin and int(result.zero_point.max()) <= scheme.qmax
    assert bool((result.scale > 0).all())

    def per_group(scale, zp):
        e = (w - dequantize(quantize(w, scale, zp, scheme), scale, zp, scheme)).abs().pow(power)
        return e.reshape(w.shape[0], -1, 32).sum(-1)

    init = compute_qparams(w, scheme)
    assert bool((per_group(result.scale, result.zero_point) <= per_group(*init) * (1 + 1e-5)).all())
    assert float(per_group(result.scale, result.zero_point).sum()) < 0.97 * float(per_group(*init).sum())  # l2 0.91, lp 0.95, l1 0.94


def test_zero_point_alone_is_undone_by_rounding_the_scale_refit_is_what_pays():
    """Why ``optimize_scale`` is on by default: HQQ's float zero point, rounded to the grid, keeps min/max's
    zero point for most groups; refitting the scale is where integer-zero-point HQQ gains."""
    w = _heavy(seed=3)
    scheme = QuantScheme(bits=4, group_size=64, symmetric=False)
    rtn = _errors(w, *compute_qparams(w, scheme), scheme)
    zero_only = hqq_qparams(w, scheme, optimize_scale=False, zero_point="integer")
    assert _errors(w, zero_only.scale, zero_only.zero_point, scheme) == pytest.approx(rtn, rel=1e-6)
    full = hqq_qparams(w, scheme)
    assert _errors(w, full.scale, full.zero_point, scheme)[0] < 0.98 * rtn[0]


def test_scales_are_exact_in_the_storage_dtype_and_the_solve_is_deterministic():
    w = _heavy(seed=5).to(torch.bfloat16)
    scheme = QuantScheme(bits=4, group_size=128, symmetric=False)
    a = hqq_qparams(w, scheme, scale_dtype=torch.bfloat16)
    b = hqq_qparams(w, scheme, scale_dtype=torch.bfloat16)
    assert torch.equal(a.scale, a.scale.to(torch.bfloat16).float())
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    assert 1 <= a.iterations <= 20
    assert hqq_qparams(w, scheme, iterations=3, tol=0).iterations == 3


# -- the pass ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_the_pass_ships_codes_that_reproduce_the_scored_weight(symmetric):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    linear.weight.data = _heavy(48, 128, seed=11)
    cfg = HQQConfig(bits=4, group_size=64, symmetric=symmetric)
    layer = HQQPass(cfg).apply("l", linear)
    assert isinstance(layer, QuantLinear)
    codes, scale, zp = layer.packed().unpack()
    scheme = cfg.scheme
    result = hqq_qparams(linear.weight.detach(), scheme)
    assert torch.equal(scale.float(), result.scale)  # the stored scale is the solved one, not re-rounded
    assert int(codes.min()) >= scheme.qmin and int(codes.max()) <= scheme.qmax
    assert torch.equal(codes, quantize(linear.weight.detach(), result.scale, result.zero_point, scheme))
    if symmetric:
        assert layer.weight_zero_point is None
    else:
        assert torch.equal(zp, result.zero_point) and zp.dtype == torch.int32
    assert torch.equal(layer.dequantized_weight(), dequantize(codes, scale, zp, scheme))
    torch.testing.assert_close(layer(torch.ones(2, 128)), torch.ones(2, 128) @ layer.dequantized_weight().t()
                               + linear.bias.detach())


def test_registered_data_free_and_asymmetric_by_default():
    assert PASSES.get("hqq") is HQQPass and HQQPass.needs_calibration is False
    cfg = HQQConfig()
    assert (cfg.bits, cfg.group_size, cfg.symmetric, cfg.iterations, cfg.lp) == (4, 128, False, 20, 0.7)
    assert not needs_calibration([{"method": "hqq"}])


@pytest.mark.parametrize(("field", "value"), [("lp", 0.0), ("lp", 1.5), ("iterations", 0), ("beta", 0.0),
                                              ("kappa", 0.5), ("refit_steps", -1), ("tol", 1.0),
                                              ("criterion", "l3"), ("observer", "mse"), ("zero_point", "float"), ("bits", 5)])
def test_bad_config_values_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        HQQConfig(**{field: value})
    with pytest.raises(Exception, match=field):  # the recipe refuses it before anything loads
        recipe_from_dict({"stages": [{"method": "hqq", field: value}]})


def test_method_hqq_starts_from_its_preset():
    from compress.cli.quantize import _preset_for
    from compress.recipes.loader import load_recipe

    assert _preset_for("hqq") == "w4a16-hqq"
    (stage,) = load_recipe("w4a16-hqq").stages
    assert stage.method == "hqq" and not stage.symmetric and stage.bits == 4 and stage.group_size == 128


# -- the recipe engine, the export, the readers ------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama through a recipe with no dataset at all, asymmetric W4g32."""
    import compress.pipeline.run as run_module

    root = tmp_path_factory.mktemp("hqq")
    folder = save_tiny("llama", root / "llama")
    stages = [{"method": "hqq", "bits": 4, "group_size": 32}]
    recipe = recipe_from_dict({"model": str(folder), "eval": {"enabled": False}, "stages": stages})
    with pytest.MonkeyPatch.context() as mp:  # a data-free method must never build calibration text
        mp.setattr(run_module, "calibration_samples",
                   lambda *a, **k: (_ for _ in ()).throw(AssertionError("calibration was built")))
        result = compress.run(recipe, root / "out")
    assert result.calibration is None and result.layers == 14
    return folder, root / "out", stages


def test_the_export_loads_with_the_in_memory_logits(exported):
    folder, out, stages = exported
    model, records = compress_model(load_model(str(folder)).model, stages)
    assert len(records) == 14
    loaded = compress.load(out, device="cpu", kernel="reference")
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(module.weight_packed, loaded.get_submodule(name).weight_packed), name
            assert torch.equal(module.weight_zero_point, loaded.get_submodule(name).weight_zero_point), name
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["symmetric"] is False and group["weights"]["observer"] == "mse"
    assert "hqq" in (out / "recipe.yaml").read_text()


def test_compressed_tensors_and_transformers_read_it(exported):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    from transformers.utils import logging as hf_logging

    _, out, _ = exported
    (scheme,) = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]).config_groups.values()
    tensors = load_file(out / "model.safetensors")
    ours = compress.load(out, device="cpu", kernel="reference")
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    for name, layer in layers.items():
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        dense = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(dense, layer.dequantized_weight(dense.dtype)), name
    hf_logging.set_verbosity_error()
    # dequantize=True: transformers 5.23-5.24 refuse asymmetric pack-quantized otherwise (FORMATS.md)
    theirs = AutoModelForCausalLM.from_pretrained(str(out),
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    for name, layer in layers.items():
        weight = theirs.get_submodule(name).weight
        assert torch.equal(weight, layer.dequantized_weight(weight.dtype)), name
