"""The GPTQ column sweep on small problems: beats RTN, is exact where it must be, survives bad Hessians."""

from __future__ import annotations

import pytest
import torch

from compress.core.errors import CompressError
from compress.core.primitives import compute_qparams, dequantize, quantize
from compress.core.scheme import QuantScheme
from compress.passes.quantize.gptq_math import gptq_quantize

MODES = {
    "plain": dict(act_order=False, static_groups=False),
    "act_order": dict(act_order=True, static_groups=False),
    "static": dict(act_order=False, static_groups=True),
    "act_static": dict(act_order=True, static_groups=True),
}


def problem(
    seed: int = 0, out_f: int = 24, in_f: int = 96, n: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random W and correlated inputs X = Z @ M (with uneven channel scales), as rows [n, in]."""
    torch.manual_seed(seed)
    z = torch.randn(n, in_f)
    m = torch.randn(in_f, in_f) / in_f**0.5 + 0.5 * torch.eye(in_f)
    x = (z @ m) * torch.linspace(0.2, 2.0, in_f)
    return torch.randn(out_f, in_f), x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x


def rtn(w: torch.Tensor, s: QuantScheme) -> torch.Tensor:
    scale, zp = compute_qparams(w, s)
    return dequantize(quantize(w, scale, zp, s), scale, zp, s)


def out_err(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - w_hat) @ x.T).norm())


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_beats_rtn_on_output_error(bits: int, group_size: int, symmetric: bool, mode: str) -> None:
    w, x = problem(bits)
    s = QuantScheme(bits, group_size, symmetric)
    # block 40 is not a multiple of the group: groups straddle blocks and need the pending update
    res = gptq_quantize(w, hessian(x), s, block_size=40, **MODES[mode])
    ratio = out_err(w, res.weight, x) / out_err(w, rtn(w, s), x)
    assert ratio < 0.95, ratio
    assert torch.isfinite(res.weight).all()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_are_the_primitives_codes_and_loss_is_the_obs_error(mode: str, symmetric: bool) -> None:
    w, x = problem(7)
    h = hessian(x)
    s = QuantScheme(3, 16, symmetric)
    res = gptq_quantize(w, h, s, block_size=32, **MODES[mode])
    assert res.codes.dtype == torch.int8 and res.codes.shape == w.shape
    assert res.scale.dtype == torch.float32 and res.zero_point.dtype == torch.int32
    assert torch.equal(res.codes, quantize(res.weight, res.scale, res.zero_point, s, res.g_idx))
    assert torch.equal(res.weight, dequantize(res.codes, res.scale, res.zero_point, s, res.g_idx))
    # Σ of the OBS terms is exactly ½ Σ_rows δᵀ (H + λI) δ for the final δ = W - Ŵ
    d = (w - res.weight).double()
    h_damped = h.double() + res.damp_used * float(h.diagonal().mean()) * torch.eye(96, dtype=torch.float64)
    assert res.loss == pytest.approx(0.5 * float(((d @ h_damped) * d).sum()), rel=1e-4)


def test_identity_hessian_is_rtn() -> None:
    torch.manual_seed(1)
    w = torch.randn(10, 64)
    for s in (QuantScheme(4, 16), QuantScheme(3, -1, symmetric=False)):
        for mode in MODES.values():
            res = gptq_quantize(w, torch.eye(64), s, block_size=24, **mode)
            scale, zp = compute_qparams(w, s)
            assert torch.equal(res.scale, scale) and torch.equal(res.zero_point, zp)
            assert torch.equal(res.codes, quantize(w, scale, zp, s))
            assert torch.equal(res.weight, rtn(w, s))


def test_block_size_does_not_change_the_solution() -> None:
    """Lazy batch updates are a reordering of the same arithmetic, not an approximation."""
    w, x = problem(3)
    s = QuantScheme(4, 32)
    a = gptq_quantize(w, hessian(x), s, block_size=8)
    b = gptq_quantize(w, hessian(x), s, block_size=96)
    assert (a.codes == b.codes).float().mean() > 0.99
    assert a.loss == pytest.approx(b.loss, rel=1e-3)


def test_dead_input_column() -> None:
    w, x = problem(4)
    x[:, [5, 40]] = 0.0
    for mode in MODES.values():
        res = gptq_quantize(w, hessian(x), QuantScheme(4, 32, symmetric=False), **mode)
        assert torch.isfinite(res.weight).all() and torch.isfinite(res.scale).all()
        assert torch.equal(res.weight[:, [5, 40]], torch.zeros(24, 2))
        assert res.loss == res.loss  # not NaN


def test_cholesky_failure_retries_with_more_damping() -> None:
    torch.manual_seed(5)
    v = torch.randn(16, 1)
    v /= v.norm()
    h = torch.eye(16) - 1.05 * (v @ v.T)  # one eigenvalue -0.05; mean diagonal ≈ 0.93
    messages: list[str] = []
    res = gptq_quantize(torch.randn(8, 16), h, QuantScheme(4, -1), damp=0.01, log=messages.append)
    assert res.damp_used == pytest.approx(0.1)
    assert len(messages) == 1 and "damp=0.01" in messages[0] and "0.1" in messages[0]
    assert torch.isfinite(res.weight).all()


def test_hopeless_hessian_raises_clearly() -> None:
    h = torch.eye(8)
    h[0, 0] = -1e4  # relative damping of a negative mean diagonal cannot help
    with pytest.raises(CompressError, match="non-positive mean"):
        gptq_quantize(torch.randn(4, 8), h, QuantScheme(4, -1))
    h = torch.eye(8)
    h[0, 1] = h[1, 0] = 1e4  # eigenvalue 1 - 1e4, mean diagonal 1: beyond 100 × mean(diag) damping
    messages: list[str] = []
    with pytest.raises(CompressError, match="not positive definite"):
        gptq_quantize(torch.randn(4, 8), h, QuantScheme(4, -1), log=messages.append)
    assert len(messages) == 4


def test_act_order_g_idx_is_a_valid_group_map() -> None:
    w, x = problem(6)
    h = hessian(x)
    s = QuantScheme(4, 32, symmetric=False)
    res = gptq_quantize(w, h, s, act_order=True)
    g = res.g_idx
    assert g is not None and g.dtype == torch.int32 and g.shape == (96,)
    assert torch.equal(torch.bincount(g.long(), minlength=3), torch.tensor([32, 32, 32]))
    # compressed-tensors "group": position in descending-diag order // group_size, per original column
    perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    assert torch.equal(g, (torch.arange(96) // 32)[torch.argsort(perm)].int())
    assert not torch.equal(g, (torch.arange(96) // 32).int())  # the test means something
    assert torch.equal(dequantize(res.codes, res.scale, res.zero_point, s, g), res.weight)
    assert res.actorder == "group"
    static = gptq_quantize(w, h, s, act_order=True, static_groups=True)
    assert static.g_idx is None and static.actorder == "weight"


def test_scales_survive_the_storage_dtype() -> None:
    w, x = problem(8)
    for dtype in (torch.float16, torch.bfloat16):
        res = gptq_quantize(w, hessian(x), QuantScheme(4, 32), scale_dtype=dtype, act_order=True)
        assert torch.equal(res.scale.to(dtype).float(), res.scale)


def test_mse_observer_inside_gptq() -> None:
    w, x = problem(9)
    w = torch.distributions.StudentT(2.5).sample(w.shape)
    s = QuantScheme(3, 32)
    mm = gptq_quantize(w, hessian(x), s)
    mse = gptq_quantize(w, hessian(x), s, observer="mse")
    assert out_err(w, mse.weight, x) < out_err(w, mm.weight, x)


def test_bad_arguments() -> None:
    with pytest.raises(CompressError, match="block size"):
        gptq_quantize(torch.randn(2, 4), torch.eye(4), QuantScheme(4, -1), block_size=0)
    with pytest.raises(CompressError, match="does not match"):
        gptq_quantize(torch.randn(2, 4), torch.eye(5), QuantScheme(4, -1))
    with pytest.raises(CompressError, match="NaN"):
        gptq_quantize(torch.randn(2, 2), torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), QuantScheme(4, -1))
