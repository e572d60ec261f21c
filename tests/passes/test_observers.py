"""Observers: minmax is compute_qparams; the MSE clip search never loses to it and wins on heavy tails."""

from __future__ import annotations

import pytest
import torch

from compress.core.errors import CompressError
from compress.core.observers import choose_qparams, group_sum, weighted_error
from compress.core.primitives import compute_qparams
from compress.core.scheme import QuantScheme
from compress.passes.quantize.rtn import RTNConfig, RTNPass


def test_minmax_is_compute_qparams() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    s = QuantScheme(4, 8, symmetric=False)
    got = choose_qparams(w, s)
    want = compute_qparams(w, s)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_never_worse_than_minmax(bits: int, group_size: int, symmetric: bool) -> None:
    torch.manual_seed(bits * 10 + group_size)
    s = QuantScheme(bits, group_size, symmetric)
    w = torch.randn(12, 64)
    importance = torch.rand(64) * 3
    mm = weighted_error(w, *compute_qparams(w, s), s, importance)
    scale, zp = choose_qparams(w, s, observer="mse", importance=importance, grid=40)
    mse = weighted_error(w, scale, zp, s, importance)
    assert scale.shape == zp.shape == mm.shape and zp.dtype == torch.int32
    assert bool((mse <= mm).all())  # per row and group, not only in total


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_strictly_better_on_heavy_tails_at_3_bits(symmetric: bool) -> None:
    torch.manual_seed(3)
    s = QuantScheme(3, 32, symmetric)
    w = torch.distributions.StudentT(2.0).sample((32, 128))
    mm = weighted_error(w, *compute_qparams(w, s), s).sum()
    mse = weighted_error(w, *choose_qparams(w, s, observer="mse"), s).sum()
    assert mse < 0.95 * mm  # measured: 0.81 (sym), 0.92 (asym)


def test_importance_changes_the_choice() -> None:
    """Columns with zero importance may be clipped freely: the weighted search is not the plain one."""
    torch.manual_seed(4)
    s = QuantScheme(3, -1)
    w = torch.randn(8, 32)
    w[:, 0] = 10.0  # an outlier column the calibration never exercises
    imp = torch.ones(32)
    imp[0] = 0.0
    weighted, _ = choose_qparams(w, s, observer="mse", importance=imp)
    plain, _ = choose_qparams(w, s, observer="mse")
    assert bool((weighted < plain).all())


def test_g_idx_path_matches_contiguous_path() -> None:
    torch.manual_seed(5)
    s = QuantScheme(4, 8, symmetric=False)
    w = torch.randn(5, 32)
    g_idx = torch.arange(32) // 8
    a = choose_qparams(w, s, observer="mse", g_idx=g_idx, grid=20)
    b = choose_qparams(w, s, observer="mse", grid=20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.allclose(group_sum(w, s, g_idx), group_sum(w, s))


def test_unknown_observer() -> None:
    with pytest.raises(CompressError, match="observer"):
        choose_qparams(torch.randn(2, 4), QuantScheme(4, -1), observer="percentile")


def test_rtn_uses_the_observer() -> None:
    torch.manual_seed(6)
    lin = torch.nn.Linear(64, 16)
    lin.weight.data = torch.distributions.StudentT(2.0).sample((16, 64))
    s = QuantScheme(3, 32)
    mm = RTNPass(RTNConfig(bits=3, group_size=32)).apply("l", lin)
    mse = RTNPass(RTNConfig(bits=3, group_size=32, observer="mse")).apply("l", lin)
    scale, _ = choose_qparams(lin.weight, s, observer="mse")
    assert torch.equal(mse.weight_scale, scale)
    w = lin.weight.detach()
    assert (w - mse.dequantized_weight()).square().sum() < (w - mm.dequantized_weight()).square().sum()
    with pytest.raises(ValueError):
        RTNConfig(observer="avg")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_batched_clip_search_matches_the_per_ratio_loop(bits, symmetric, group_size, monkeypatch):
    """The contiguous-group search evaluates many ratios per step; the general path (taken with an
    explicit g_idx) loops over them one at a time. Both must pick exactly the same scales and zero points,
    including the tie rule, whatever the step size."""
    import compress.core.observers as observers
    from compress.core.primitives import group_index

    torch.manual_seed(bits * 10 + group_size)
    w = torch.randn(48, 128) * torch.rand(48, 1)
    w[3, 5] = 9.0  # an outlier worth clipping
    importance = torch.rand(128)
    scheme = QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric)
    g_idx = group_index(128, scheme).to(torch.int32)
    loop = choose_qparams(w, scheme, observer="mse", importance=importance, g_idx=g_idx)
    for step in (1, 48 * 128 * 7, 1 << 20):
        monkeypatch.setattr(observers, "_SEARCH_ELEMENTS", step)
        fast = choose_qparams(w, scheme, observer="mse", importance=importance)
        assert torch.equal(fast[0], loop[0]) and torch.equal(fast[1], loop[1])
