"""Unstructured / N:M pruners on single layers: exact mask patterns, calibrated choices, SparseGPT's update,
joint quantization, and GPTQ keeping an earlier stage's zeros."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compress.calibrate.stats import HessianStats, InputNormStats
from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme
from compress.core.sparsity import (
    NMPattern,
    from_bitmask,
    nm_mask,
    row_mask,
    to_bitmask,
)
from compress.kernels.quant_linear import QuantLinear
from compress.passes import PASSES
from compress.passes.prune.sparsegpt_math import sparsegpt_prune
from compress.passes.quantize.gptq_math import gptq_quantize


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5
    scales = torch.logspace(-1, 1, k)[torch.randperm(k, generator=gen)]
    return (torch.randn(n, k, generator=gen) @ mix + 0.1 * torch.randn(n, k, generator=gen)) * scales


def _layer(out_f: int = 24, in_f: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def _stats(cls, x: torch.Tensor):
    stats = cls(x.shape[1])
    for chunk in x.split(100):
        stats.add_batch(chunk)
    return stats


def _run(method: str, linear: nn.Linear, x: torch.Tensor, **fields) -> nn.Module:
    layer_pass = PASSES.get(method)(PASSES.get(method).config_cls(method=method, **fields))
    layer_pass.check_layer("layer", linear)
    stats = layer_pass.make_stats("layer", linear) if layer_pass.needs_calibration else None
    if stats is not None:
        for chunk in x.split(100):
            stats.add_batch(chunk)
    return layer_pass.apply("layer", linear, stats)


def _facts(method: str, module: nn.Module, **fields) -> dict:
    """What the pass records about the layer it returned (the sweep merges it into the layer's record)."""
    return PASSES.get(method)(PASSES.get(method).config_cls(method=method, **fields)).record_facts("layer", module)


def _rel_output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w_hat - w) @ x.T).norm() / (w @ x.T).norm())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_exact_sparsity_per_row(method: str, sparsity: float) -> None:
    x = _correlated_inputs(400, 64)
    pruned = _run(method, _layer(), x, sparsity=sparsity)
    zeros = (pruned.weight == 0).sum(dim=1)
    assert torch.all(zeros == round(sparsity * 64)), zeros
    assert _facts(method, pruned, sparsity=sparsity) == {"sparsity": "unstructured"}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_n_of_every_m(method: str, pattern: str) -> None:
    nm = NMPattern.parse(pattern)
    pruned = _run(method, _layer(), _correlated_inputs(400, 64), pattern=pattern)
    kept = (pruned.weight != 0).reshape(24, 64 // nm.m, nm.m).sum(dim=-1)
    assert torch.all(kept == nm.n)
    assert _facts(method, pruned, pattern=pattern) == {"sparsity": pattern}


def test_wanda_uses_input_norms() -> None:
    """A loud input channel keeps its (small) weights under Wanda but loses them under magnitude."""
    x = torch.randn(300, 32)
    x[:, 0] *= 1000

    def small_first_column() -> nn.Linear:
        linear = _layer(8, 32)
        with torch.no_grad():
            linear.weight[:, 0] = 0.01  # far below the median |w| (~0.09) of nn.Linear's init
        return linear

    wanda = _run("wanda", small_first_column(), x, sparsity=0.5)
    magnitude = _run("magnitude", small_first_column(), x, sparsity=0.5)
    assert torch.all(wanda.weight[:, 0] != 0)
    assert torch.all(magnitude.weight[:, 0] == 0)


def test_calibrated_pruners_beat_magnitude_on_outputs() -> None:
    x = _correlated_inputs(2000, 64, seed=3)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        linear = _layer(32, 64, seed=1)
        w = linear.weight.detach().clone()
        errors[method] = _rel_output_error(w, _run(method, linear, x, sparsity=0.5).weight.detach(), x)
    assert errors["wanda"] < errors["magnitude"]
    assert errors["sparsegpt"] < errors["wanda"]


def test_sparsegpt_joint_quantization_packs_codes_with_exact_zeros() -> None:
    x = _correlated_inputs(800, 64)
    linear = _layer()
    w = linear.weight.detach().clone()
    quant = _run("sparsegpt", linear, x, pattern="2:4", bits=4, group_size=32)
    assert isinstance(quant, QuantLinear)
    assert _facts("sparsegpt", quant, pattern="2:4", bits=4, group_size=32) == {"sparsity": "2:4", "observer": "minmax"}
    w_hat = quant.dequantized_weight(torch.float32)
    assert torch.all((w_hat != 0).reshape(24, 16, 4).sum(-1) <= 2)
    # the survivors are on the 4-bit grid: re-quantizing them with the stored scales changes nothing
    from compress.core.primitives import dequantize, quantize

    packed = quant.packed()
    codes, scale, zp = packed.unpack()
    assert torch.equal(dequantize(quantize(w_hat, scale, zp, quant.scheme), scale, zp, quant.scheme), w_hat)
    # joint quantization lets the OBS update absorb rounding error too: better than pruning with SparseGPT
    # and then rounding the survivors to the same grid without any update
    stats = _stats(HessianStats, x)
    pruned = nn.Linear(64, 24, bias=False)
    pruned.weight.data = sparsegpt_prune(w, stats.hessian, pattern=NMPattern(2, 4)).weight
    rounded = QuantLinear.from_linear(pruned, QuantScheme(4, 32)).dequantized_weight(torch.float32)
    assert _rel_output_error(w, w_hat, x) < _rel_output_error(w, rounded, x)


def test_sparsegpt_math_refuses_bad_patterns() -> None:
    with pytest.raises(CompressError, match="runs of 4"):
        sparsegpt_prune(torch.randn(4, 10), torch.eye(10), pattern=NMPattern(2, 4))
    with pytest.raises(CompressError, match="N:M"):
        NMPattern.parse("two of four")
    with pytest.raises(CompressError, match="between 1 and M-1"):
        NMPattern.parse("4:4")


def test_gptq_keeps_an_earlier_stage_zeros() -> None:
    x = _correlated_inputs(800, 64)
    w = torch.randn(24, 64)
    keep = nm_mask(w.abs(), NMPattern(2, 4))
    stats = _stats(HessianStats, x)
    result = gptq_quantize(w * keep, stats.hessian, QuantScheme(4, 32, False), keep_mask=keep)
    assert torch.all(result.weight[~keep] == 0)
    free = gptq_quantize(w * keep, stats.hessian, QuantScheme(4, 32, False))
    assert (free.weight[~keep] != 0).any()  # without the mask the OBS update fills the holes


def test_input_norm_stats_match_hessian_diagonal() -> None:
    x = torch.randn(250, 16)
    norms, hessian = _stats(InputNormStats, x), _stats(HessianStats, x)
    torch.testing.assert_close(norms.sq_norms, hessian.sq_norms)
    assert norms.tokens == 250


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), density=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_bitmask_round_trip(rows: int, cols: int, density: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * (torch.rand(rows, cols, generator=gen) < density)
    parts = to_bitmask(w)
    assert parts["bitmask"].shape == (rows, (cols + 7) // 8) and parts["compressed"].numel() == int((w != 0).sum())
    assert torch.equal(from_bitmask(parts), w)


def test_bitmask_matches_numpy_little_bit_order() -> None:
    import numpy

    keep = torch.rand(5, 21) < 0.4
    want = numpy.packbits(keep.numpy(), axis=-1, bitorder="little")
    assert torch.equal(to_bitmask(keep.float())["bitmask"], torch.from_numpy(want))


def test_bitmask_parts_are_validated() -> None:
    parts = to_bitmask(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]))
    with pytest.raises(CompressError, match="compressed must hold 3"):
        from_bitmask({**parts, "compressed": parts["compressed"][:2]})
    with pytest.raises(CompressError, match="row_offsets"):
        from_bitmask({**parts, "row_offsets": torch.tensor([0, 1])})
    with pytest.raises(CompressError, match="lacks its bitmask"):
        from_bitmask({k: v for k, v in parts.items() if k != "bitmask"})


def test_row_mask_budget() -> None:
    scores = torch.rand(3, 10)
    assert torch.all((~row_mask(scores, 0.25)).sum(1) == 2)  # round(2.5) = 2 (banker's)
    assert torch.all(row_mask(scores, 0.0))
