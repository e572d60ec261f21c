"""Low-rank (EoRA) compensation: the math on small tensors, the pass on one layer, and its refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.calibrate.stats import HessianStats
from compress.core.errors import CompressError
from compress.kernels.quant_linear import QuantLinear
from compress.passes import PASSES
from compress.passes.quantize.lowrank import LowRankConfig, LowRankPass
from compress.passes.quantize.lowrank_math import plain_lowrank, weighted_error, weighted_lowrank


def _anisotropic(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channel scales span three decades, with correlations (a real layer's inputs do): one
    distribution for every ``seed``, which only draws the samples."""
    g = torch.Generator().manual_seed(12345)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scales = torch.logspace(-1.5, 1.5, k)[torch.randperm(k, generator=g)]
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scales) @ mix


def _output_error(delta, x, a=None, b=None) -> float:
    residual = delta if a is None else delta - b @ a
    return float((x @ residual.T).norm())


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(1)
    x = _anisotropic(2048, 64)
    delta = torch.randn(48, 64, generator=g)
    return delta, x, x.T @ x / x.shape[0]


def test_weighted_beats_plain_svd_on_the_output_error(problem):
    delta, x, h = problem
    for rank in (2, 8, 16):
        weighted = _output_error(delta, x, *weighted_lowrank(delta, h, rank, damp=1e-6))
        plain = _output_error(delta, x, *plain_lowrank(delta, rank))
        assert weighted < 0.9 * plain, (rank, weighted, plain)


def test_error_decreases_with_rank(problem):
    delta, x, h = problem
    errors = [_output_error(delta, x, *weighted_lowrank(delta, h, r)) for r in (1, 2, 4, 8, 16, 32)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] < _output_error(delta, x)


def test_full_rank_recovers_the_error_in_the_weighted_norm(problem):
    delta, _, h = problem
    a, b = weighted_lowrank(delta, h, min(delta.shape), damp=1e-6)
    assert weighted_error(delta, h, a, b) < 1e-8 * weighted_error(delta, h)


def test_tiny_eigenvalues_are_guarded():
    """A Hessian with dead directions (rank 4 of 32) still gives bounded, finite factors."""
    x = torch.randn(256, 4) @ torch.randn(4, 32)
    delta = torch.randn(16, 32)
    a, b = weighted_lowrank(delta, x.T @ x / 256, 4)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (b @ a).norm() < 10 * delta.norm()


def _stats(x: torch.Tensor) -> HessianStats:
    stats = HessianStats(x.shape[-1])
    stats.add_batch(x)
    return stats


def _layer(out_f: int = 48, in_f: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=True)


def _pass(rank: int, quantizer: dict) -> LowRankPass:
    return PASSES.get("lowrank")(LowRankConfig.model_validate({"method": "lowrank", "rank": rank,
                                                                "quantizer": quantizer}))


@pytest.mark.parametrize("quantizer", [{"method": "rtn", "bits": 3, "group_size": 32},
                                       {"method": "gptq", "bits": 3, "group_size": 32}])
def test_compensated_layer_beats_the_quantized_layer(quantizer):
    layer = _layer()
    calib, held_out = _anisotropic(1024, 64, seed=2), _anisotropic(512, 64, seed=3)
    plain = PASSES.get(quantizer["method"])(PASSES.get(quantizer["method"]).config_cls.model_validate(quantizer))
    stats = plain.make_stats("l", layer) if plain.needs_calibration else None
    if stats is not None:
        stats.add_batch(calib)
    quantized = plain.apply("l", layer, stats)
    lowrank = _pass(8, quantizer)
    compensated = lowrank.apply("l", layer, _stats(calib) if quantizer["method"] == "gptq" else
                                _feed(lowrank.make_stats("l", layer), calib))
    assert isinstance(compensated, QuantLinear) and compensated.lowrank_rank == 8
    with torch.no_grad():
        reference = layer(held_out)
        err_q = (quantized(held_out) - reference).norm()
        err_c = (compensated(held_out) - reference).norm()
        # the codes are the quantizer's own: the compensation changes nothing else
        assert torch.equal(compensated.weight_packed, quantized.weight_packed)
    assert err_c < 0.7 * err_q, (float(err_c), float(err_q))  # held-out inputs of the calibration's distribution
    assert lowrank.reduction["l"] < 0.45  # on the calibration Hessian, squared (0.38 for act-order + auto GPTQ)
    assert lowrank.record_facts("l", compensated)["lowrank"] == 8
    assert lowrank.describe() == plain.describe()  # the scheme tag: the rank is in the record


def _feed(stats, x):
    stats.add_batch(x)
    return stats


def test_factors_follow_the_model_dtype():
    layer = _layer().to(torch.bfloat16)
    module = _pass(4, {"method": "rtn", "bits": 4, "group_size": 32}).apply("l", layer, _stats(torch.randn(64, 64)))
    assert module.lora_A.dtype == module.lora_B.dtype == torch.bfloat16 == module.weight_scale.dtype
    assert set(module.state_dict()) >= {"lora_A", "lora_B"}  # buffers: moved with .to, kept by resume
    fresh = QuantLinear(64, 48, module.scheme, bias=True, scale_dtype=torch.bfloat16)
    fresh.load_state_dict(module.state_dict())  # a module built without factors takes them (resume)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), module(x))


def test_rank_must_fit_the_layer():
    layer = _layer(out_f=16, in_f=64)
    with pytest.raises(CompressError, match="below min\\(in, out\\) = 16"):
        _pass(16, {"method": "rtn", "group_size": 32}).check_layer("l", layer)
    with pytest.raises(ValueError, match="greater than 0"):
        LowRankConfig.model_validate({"method": "lowrank", "rank": 0, "quantizer": {"method": "rtn"}})


def test_no_calibration_data_is_refused():
    lowrank = _pass(4, {"method": "rtn", "group_size": 32})
    assert lowrank.needs_calibration
    with pytest.raises(CompressError, match="needs calibration inputs"):
        lowrank.apply("l", _layer(), None)
    with pytest.raises(CompressError, match="no tokens"):
        lowrank.apply("l", _layer(), HessianStats(64))


@pytest.mark.parametrize("quantizer, words", [
    ({"method": "awq"}, "layer-wise quantizers"),
    ({"method": "lowrank", "rank": 2, "quantizer": {"method": "rtn"}}, "another lowrank"),
    ({"method": "wanda"}, "does not quantize"),
    ({"method": "nope"}, "unknown method"),
])
def test_what_cannot_be_wrapped(quantizer, words):
    with pytest.raises((ValueError, CompressError), match=words):
        _pass(4, quantizer)


def test_one_ignore_list_for_stage_and_quantizer():
    config = LowRankConfig.model_validate({"method": "lowrank", "rank": 4, "ignore": ["lm_head", "re:.*down.*"],
                                           "quantizer": {"method": "gptq", "bits": 3}})
    assert config.quantizer.ignore == config.ignore == ["lm_head", "re:.*down.*"]
    again = LowRankConfig.model_validate(config.model_dump(mode="json"))  # the recorded recipe re-runs
    assert again == config and again.quantizer.bits == 3
    with pytest.raises(ValueError, match="give it once"):
        LowRankConfig.model_validate({"method": "lowrank", "rank": 4, "ignore": ["a"],
                                      "quantizer": {"method": "gptq", "ignore": ["b"]}})


def test_a_resumed_block_keeps_its_factors():
    """``--resume`` saves ``block.state_dict()`` and rebuilds each layer from its description: the factors
    come back with the codes."""
    from compress.pipeline.resume import describe, rebuild

    block = nn.Module()
    block.l = _pass(4, {"method": "rtn", "group_size": 32}).apply("l", _layer(), _stats(_anisotropic(256, 64)))
    saved = {k: v.clone() for k, v in block.state_dict().items()}
    restored = nn.Module()
    restored.l = rebuild(describe(block.l), saved, "l")
    restored.load_state_dict(saved, strict=True, assign=True)
    x = torch.randn(3, 64)
    assert restored.l.lowrank_rank == 4 and torch.equal(restored.l(x), block.l(x))
