"""HessianStats: the running average equals the one-shot 2/n XᵀX, whatever the batching."""

from __future__ import annotations

import pytest
import torch

from compress.calibrate import stats as stats_module
from compress.calibrate.stats import HESSIAN_DTYPE_ENV, HessianStats, product_dtype
from compress.core.errors import CompressError


@pytest.fixture(autouse=True)
def _exact_products(monkeypatch, request):
    """The exactness tests below pin float32 products; the bfloat16 tests set their own."""
    if "bfloat16" not in request.node.name and "product_dtype" not in request.node.name:
        monkeypatch.setenv(HESSIAN_DTYPE_ENV, "float32")


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


def test_bfloat16_products_stay_close_to_float64() -> None:
    """bfloat16 products (inputs rounded to 8 mantissa bits, float32 accumulation between batches) are
    within a fraction of a percent of the exact Hessian: far below GPTQ's 1% damping of the diagonal."""
    torch.manual_seed(3)
    scale = torch.rand(300) * 4 + 0.1  # channels of very different energy, as real activations
    batches = [torch.randn(512, 300) * scale for _ in range(6)]
    low = HessianStats(300, product_dtype=torch.bfloat16)
    exact = HessianStats(300, product_dtype=torch.float32)
    for batch in batches:
        low.add_batch(batch)
        exact.add_batch(batch)
    x = torch.cat(batches).double()
    ref = 2 * x.T @ x / x.shape[0]
    err = (low.hessian.double() - ref).norm() / ref.norm()
    assert err < 5e-3
    assert (exact.hessian.double() - ref).norm() / ref.norm() < 1e-5
    assert not torch.equal(low.hessian, exact.hessian)  # the bfloat16 path really ran
    assert torch.equal(low.hessian, low.hessian.T)
    torch.testing.assert_close(low.sq_norms.double(), x.square().sum(0), rtol=1e-5, atol=1e-4)  # exact path


def test_product_dtype_choice(monkeypatch) -> None:
    monkeypatch.setenv(HESSIAN_DTYPE_ENV, "bfloat16")
    assert product_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv(HESSIAN_DTYPE_ENV, "float32")
    assert product_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setenv(HESSIAN_DTYPE_ENV, "auto")
    assert product_dtype(torch.device("meta")) == torch.float32  # accelerators keep exact products
    monkeypatch.setattr(stats_module, "_probed", {})
    monkeypatch.setattr(stats_module, "_probe_cpu", lambda: torch.bfloat16)
    assert product_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv(HESSIAN_DTYPE_ENV, "half")
    with pytest.raises(CompressError, match="COMPRESS_HESSIAN_DTYPE"):
        product_dtype(torch.device("cpu"))


def test_product_dtype_probe_measures_this_cpu(monkeypatch) -> None:
    """The probe keeps float32 where bfloat16 is not clearly faster: with a bfloat16 matmul made slow, it
    must answer float32."""
    assert stats_module._probe_cpu(tokens=256, width=64, repeats=1) in (torch.float32, torch.bfloat16)
    real_matmul = torch.Tensor.__matmul__

    def slow_bf16(a, b):
        if a.dtype == torch.bfloat16:
            import time
            time.sleep(0.05)  # far above a 256x64 float32 product even on a loaded machine (best of 3)
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", slow_bf16)
    assert stats_module._probe_cpu(tokens=256, width=64, repeats=3) == torch.float32


def test_shared_accumulators_must_agree_on_product_dtype() -> None:
    assert HessianStats(8, product_dtype=torch.float32).share_key() != \
        HessianStats(8, product_dtype=torch.bfloat16).share_key()
