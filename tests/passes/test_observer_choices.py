"""GPTQ's ``observer: auto`` (whole solves compared per layer) and RTN's ``observer: imatrix``."""

from __future__ import annotations

import pytest
import torch

from compress.calibrate.stats import HessianStats, InputNormStats
from compress.core.errors import CompressError
from compress.core.observers import weighted_error
from compress.core.scheme import QuantScheme
from compress.passes.quantize.gptq import AUTO_CANDIDATES, GPTQConfig, GPTQPass
from compress.passes.quantize.gptq_math import gptq_quantize, output_error
from compress.passes.quantize.rtn import RTNConfig, RTNPass


def _heavy_layer(seed: int, width: int = 64, rows: int = 24) -> tuple[torch.nn.Linear, torch.Tensor]:
    """A layer with heavy-tailed weights and anisotropic inputs (a few loud channels): clipping matters and
    where the error falls matters."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(width, rows, bias=False).requires_grad_(False)
    lin.weight.copy_(torch.distributions.StudentT(2.5).sample((rows, width)) * 0.05)
    loud = torch.ones(width)
    loud[torch.randperm(width, generator=g)[: width // 8]] = 8.0
    x = torch.randn(512, width, generator=g) * loud
    return lin, x


def _hessian(lin: torch.nn.Linear, x: torch.Tensor) -> HessianStats:
    stats = HessianStats(lin.in_features)
    stats.add_batch(x)
    return stats


def test_observer_options_reach_the_search() -> None:
    """A shallower clipping range changes the solve (the options are not dropped on the way)."""
    lin, x = _heavy_layer(0)
    h = _hessian(lin, x).hessian
    scheme = QuantScheme(bits=2, group_size=32)
    kw = dict(static_groups=True)  # scales from the original weights, so they compare with min/max's
    deep = gptq_quantize(lin.weight, h, scheme, observer="mse", **kw)
    shallow = gptq_quantize(lin.weight, h, scheme, observer="mse", observer_options={"max_shrink": 0.05, "grid": 5},
                            **kw)
    ratio = shallow.scale / gptq_quantize(lin.weight, h, scheme, observer="minmax", **kw).scale
    assert float(ratio.min()) >= 0.95 - 1e-3  # nothing clipped deeper than the 5% asked for
    assert float((deep.scale / shallow.scale).min()) < 0.9  # the full search does clip deeper


@pytest.mark.parametrize("bits,group_size,act_order", [(2, 32, False), (3, 32, True), (4, -1, False)])
def test_auto_keeps_the_best_whole_solve(bits: int, group_size: int, act_order: bool) -> None:
    """``auto``'s layer has the lowest output error of the three candidate solves, and its record names the
    observer of the solve it kept."""
    lin, x = _heavy_layer(bits)
    cfg = dict(bits=bits, group_size=group_size, act_order=act_order)
    stats = _hessian(lin, x)
    auto = GPTQPass(GPTQConfig(observer="auto", **cfg))
    got = auto.apply("layer", lin, stats)
    errors = []
    for observer, options in AUTO_CANDIDATES:
        solve = gptq_quantize(lin.weight, stats.hessian, auto.config.scheme, act_order=act_order,
                              static_groups=act_order, observer=observer, observer_options=options)
        errors.append(output_error(lin.weight, solve.weight, stats.hessian))
    mine = output_error(lin.weight, got.dequantized_weight(), stats.hessian)
    assert mine == pytest.approx(min(errors), rel=1e-5)
    chosen = AUTO_CANDIDATES[errors.index(min(errors))][0]
    assert auto.record_facts("layer", got)["observer"] == chosen
    # and it is at least as good as the fixed default (mse) on this layer
    fixed = GPTQPass(GPTQConfig(observer="mse", **cfg)).apply("layer", lin, stats)
    assert mine <= output_error(lin.weight, fixed.dequantized_weight(), stats.hessian) * (1 + 1e-6)


def test_auto_returns_the_winner_wherever_it_stands(monkeypatch) -> None:
    """With candidates ordered so that the best solve is neither first nor last, ``auto`` returns exactly that
    solve (the comparison is real, not a default that happens to win)."""
    from compress.passes.quantize import gptq as gptq_module

    candidates = (("mse", {"max_shrink": 0.8, "grid": 1}),  # only 1.0 or 0.2 of the range: poor
                  ("mse", {"max_shrink": 0.8, "grid": 80}),
                  ("minmax", {}))
    monkeypatch.setattr(gptq_module, "AUTO_CANDIDATES", candidates)
    lin, x = _heavy_layer(7)
    stats = _hessian(lin, x)
    p = GPTQPass(GPTQConfig(observer="auto", bits=3, group_size=32, act_order=False))
    got = p.apply("l", lin, stats).dequantized_weight()
    solves = [gptq_quantize(lin.weight, stats.hessian, p.config.scheme, observer=o, observer_options=op).weight
              for o, op in candidates]
    errors = [output_error(lin.weight, s, stats.hessian) for s in solves]
    assert errors.index(min(errors)) == 1 and errors[1] < errors[0] and errors[1] < errors[2]
    assert torch.equal(got, solves[1])


def test_imatrix_is_the_weighted_search_for_gptq() -> None:
    lin, x = _heavy_layer(3)
    stats = _hessian(lin, x)
    a = GPTQPass(GPTQConfig(observer="imatrix", bits=3, group_size=32)).apply("l", lin, stats)
    b = GPTQPass(GPTQConfig(observer="mse", bits=3, group_size=32))
    bq = b.apply("l", lin, stats)
    assert torch.equal(a.dequantized_weight(), bq.dequantized_weight())
    assert GPTQPass(GPTQConfig(observer="imatrix")).record_facts("l", a)["observer"] == "mse"


def test_rtn_imatrix_weighs_the_error_by_input_energy() -> None:
    """The importance-weighted search gives a lower activation-weighted error than the plain search, and
    calibration is asked for only when it is needed."""
    lin, x = _heavy_layer(4)
    scheme = QuantScheme(bits=3, group_size=32)
    plain = RTNPass(RTNConfig(bits=3, group_size=32, observer="mse"))
    imx = RTNPass(RTNConfig(bits=3, group_size=32, observer="imatrix"))
    assert not plain.needs_calibration and imx.needs_calibration
    assert plain.make_stats("l", lin) is None
    stats = imx.make_stats("l", lin)
    assert isinstance(stats, InputNormStats)
    stats.add_batch(x)
    importance = x.square().mean(dim=0)
    errs = {}
    for label, p, s in (("plain", plain, None), ("imatrix", imx, stats)):
        q = p.apply("l", lin, s)
        errs[label] = float(weighted_error(lin.weight, q.weight_scale.float(), torch.zeros_like(q.weight_scale,
                                           dtype=torch.int32), scheme, importance).sum())
        out_err = float(((lin.weight - q.dequantized_weight()) @ x.T).square().sum())
        errs[label + "_out"] = out_err
    assert errs["imatrix"] < errs["plain"]
    assert errs["imatrix_out"] < errs["plain_out"]
    assert imx.record_facts("l", imx.apply("l", lin, stats))["observer"] == "mse"


def test_rtn_imatrix_without_data_is_one_sentence() -> None:
    lin, _ = _heavy_layer(5)
    with pytest.raises(CompressError, match="imatrix observer needs calibration"):
        RTNPass(RTNConfig(observer="imatrix")).apply("l", lin, None)
