"""GPTQPass: config validation, the stats contract with the pipeline, and the QuantLinear it returns."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from compress.calibrate.stats import HessianStats
from compress.core.errors import CompressError
from compress.core.packing import pack_weight
from compress.kernels.quant_linear import QuantLinear
from compress.passes import PASSES
from compress.passes.quantize.gptq import GPTQConfig, GPTQPass, pack_result
from compress.passes.quantize.gptq_math import gptq_quantize
from compress.passes.quantize.rtn import RTNConfig, RTNPass


def calibrate(p: GPTQPass, lin: torch.nn.Linear, batches: list[torch.Tensor]) -> HessianStats:
    """What the pipeline does between make_stats and apply."""
    stats = p.make_stats("layer", lin)
    for b in batches:
        stats.add_batch(b)
    return stats


def layer_and_inputs(
    seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Linear, list[torch.Tensor]]:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(64, 16).to(dtype)
    mix = torch.randn(64, 64) / 8 + 0.5 * torch.eye(64)
    batches = [(torch.randn(2, 96, 64) @ mix).to(dtype) for _ in range(3)]
    return lin, batches


def test_registered_and_validated() -> None:
    assert PASSES.get("gptq") is GPTQPass
    assert GPTQPass.needs_calibration and not RTNPass.needs_calibration
    cfg = GPTQConfig()
    assert (cfg.damp, cfg.block_size, cfg.act_order, cfg.static_groups, cfg.observer) == (
        0.01,
        128,
        True,
        True,  # implied by act_order
        "auto",
    )
    for bad in (dict(damp=0.0), dict(damp=1.0), dict(block_size=0), dict(observer="max"), dict(bits=5)):
        with pytest.raises(ValidationError):
            GPTQConfig(**bad)
    assert RTNPass(RTNConfig()).make_stats("x", torch.nn.Linear(4, 4)) is None


@pytest.mark.parametrize(
    "options",
    [
        dict(bits=4, group_size=32),
        dict(bits=3, group_size=16, symmetric=False, act_order=True),
        dict(bits=2, group_size=32, act_order=True, static_groups=True, observer="mse"),
        dict(bits=8, group_size=-1, symmetric=False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_the_solved_weight(options: dict, dtype: torch.dtype) -> None:
    lin, batches = layer_and_inputs(0, dtype)
    cfg = GPTQConfig(block_size=24, **{"observer": "mse", "act_order": False, **options})  # one solve to compare
    p = GPTQPass(cfg)
    stats = calibrate(p, lin, batches)
    assert stats.hessian.dtype == torch.float32
    result = gptq_quantize(
        lin.weight,
        stats.hessian,
        cfg.scheme,
        block_size=24,
        act_order=cfg.act_order,
        static_groups=cfg.static_groups,
        observer=cfg.observer,
        scale_dtype=dtype,
    )
    q = p.apply("layer", lin, stats)
    stats.free()
    assert isinstance(q, QuantLinear) and q.weight_scale.dtype == dtype
    assert torch.equal(q.dequantized_weight(), result.weight)
    assert (q.weight_g_idx is not None) == (cfg.act_order and not cfg.static_groups)
    x = batches[0][:1].float()
    want = F.linear(x, result.weight, lin.bias.float())
    torch.testing.assert_close(
        q(x.to(dtype)).float(),
        want,
        rtol=2e-2 if dtype != torch.float32 else 1e-5,
        atol=5e-2 if dtype != torch.float32 else 1e-5,
    )
    # packing the codes directly == pack_weight on the dequantized result with the exact scales
    direct = pack_result(result, cfg, dtype).tensors("m")
    via = pack_weight(
        result.weight,
        cfg.scheme,
        scale=result.scale,
        zero_point=result.zero_point,
        g_idx=result.g_idx,
        scale_dtype=dtype,
    ).tensors("m")
    assert direct.keys() == via.keys()
    for k in direct:
        assert torch.equal(direct[k], via[k]), k


def test_beats_rtn_through_the_pass() -> None:
    lin, batches = layer_and_inputs(1)
    x = torch.cat([b.reshape(-1, 64) for b in batches])
    ref = lin(x)
    for bits in (2, 3, 4):
        p = GPTQPass(GPTQConfig(bits=bits, group_size=32, act_order=True))
        gptq = p.apply("layer", lin, calibrate(p, lin, batches))
        rtn = RTNPass(RTNConfig(bits=bits, group_size=32)).apply("layer", lin)
        assert (gptq(x) - ref).norm() < 0.95 * (rtn(x) - ref).norm()


def test_few_tokens_warn_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    lin, batches = layer_and_inputs(2)
    p = GPTQPass(GPTQConfig(group_size=32))
    with caplog.at_level(logging.WARNING, logger="compress"):
        p.apply("model.layers.0.mlp", lin, calibrate(p, lin, [batches[0][0, :40]]))
    assert "calibration saw 40 tokens for layer model.layers.0.mlp with 64 inputs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compress"):
        p.apply("l", lin, calibrate(p, lin, batches))
    assert caplog.text == ""


def test_missing_or_empty_stats_and_bad_group() -> None:
    lin, _ = layer_and_inputs(3)
    p = GPTQPass(GPTQConfig(group_size=32))
    with pytest.raises(CompressError, match="statistics"):
        p.apply("l", lin, None)
    with pytest.raises(CompressError, match="no tokens"):
        p.apply("l", lin, HessianStats(64))
    bad = GPTQPass(GPTQConfig(group_size=48))
    with pytest.raises(CompressError, match="not divisible"):
        bad.apply("l", lin, calibrate(bad, lin, [torch.randn(300, 64)]))


def test_act_order_keeps_groups_contiguous_and_refuses_dynamic_groups() -> None:
    """Readers refuse actorder: group (compressed-tensors >= 0.19, vLLM, GPTQModel): act_order implies
    static groups, and asking for dynamic ones is one sentence."""
    from pydantic import ValidationError

    assert GPTQConfig(act_order=True).static_groups is True
    assert GPTQConfig().static_groups is True  # act_order is the default
    assert GPTQConfig(act_order=False).static_groups is False
    assert GPTQConfig(static_groups=False, act_order=False).static_groups is False
    with pytest.raises(ValidationError, match="refused by compressed-tensors >= 0.19"):
        GPTQConfig(act_order=True, static_groups=False)
    with pytest.raises(ValidationError, match="refused by compressed-tensors >= 0.19"):
        GPTQConfig(static_groups=False)  # the default act_order counts too
