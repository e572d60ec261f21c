"""HessianStats: the running average equals the one-shot 2/n XᵀX, whatever the batching."""

from __future__ import annotations

import pytest
import torch

from compress.calibrate.stats import HessianStats
from compress.core.errors import CompressError


def test_running_average_equals_one_shot() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(2, 7, 12), torch.randn(3, 5, 12), torch.randn(1, 1, 12), torch.randn(4, 12)]
    stats = HessianStats(12)
    for b in batches:
        stats.add_batch(b)
    x = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    n = x.shape[0]
    assert stats.tokens == n == 14 + 15 + 1 + 4
    assert stats.hessian.dtype == torch.float32
    torch.testing.assert_close(stats.hessian.double(), 2 / n * x.T @ x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.sq_norms.double(), x.square().sum(0), rtol=1e-5, atol=1e-6)


def test_low_precision_inputs_accumulate_in_float32() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 8).to(torch.bfloat16)
    stats = HessianStats(8)
    stats.add_batch(x[:40])
    stats.add_batch(x[40:])
    ref = 2 / 64 * x.double().T @ x.double()
    assert stats.hessian.dtype == torch.float32
    torch.testing.assert_close(stats.hessian.double(), ref, rtol=1e-5, atol=1e-6)


def test_stable_over_many_batches() -> None:
    """A normalised running average: 2000 batches of large inputs neither blow up nor drift."""
    torch.manual_seed(2)
    stats = HessianStats(4)
    ref = torch.zeros(4, 4, dtype=torch.float64)
    for _ in range(2000):
        x = 1e3 * torch.randn(3, 4)
        stats.add_batch(x)
        ref += x.double().T @ x.double()
    torch.testing.assert_close(stats.hessian.double(), 2 * ref / stats.tokens, rtol=1e-4, atol=1e-2)


def test_empty_batch_wrong_width_and_free() -> None:
    stats = HessianStats(6)
    stats.add_batch(torch.zeros(0, 6))
    assert stats.tokens == 0
    assert torch.equal(stats.hessian, torch.zeros(6, 6))
    with pytest.raises(CompressError, match="6"):
        stats.add_batch(torch.zeros(2, 5))
    stats.add_batch(torch.ones(2, 6))
    stats.free()
    assert stats.tokens == 2
    with pytest.raises(CompressError, match="freed"):
        _ = stats.hessian
    with pytest.raises(CompressError, match="freed"):
        stats.add_batch(torch.ones(1, 6))


@pytest.mark.parametrize("in_features", [100, 600, 2050])
def test_triangular_accumulation_is_the_full_hessian(in_features):
    """Wide layers accumulate only the upper block rows; the Hessian read back must be the full 2/n XᵀX,
    exactly symmetric, and stay right when more batches arrive after a read."""
    torch.manual_seed(in_features)
    stats = HessianStats(in_features)
    batches = [torch.randn(2, 40, in_features) for _ in range(3)]
    for batch in batches[:2]:
        stats.add_batch(batch)
    seen = torch.cat([b.reshape(-1, in_features) for b in batches[:2]]).double()
    hessian = stats.hessian
    torch.testing.assert_close(hessian.double(), 2 * seen.T @ seen / seen.shape[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(hessian, hessian.T)
    stats.add_batch(batches[2])
    seen = torch.cat([seen, batches[2].reshape(-1, in_features).double()])
    torch.testing.assert_close(stats.hessian.double(), 2 * seen.T @ seen / seen.shape[0], rtol=1e-5, atol=1e-5)
