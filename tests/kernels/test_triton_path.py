"""The triton kernels under ``TRITON_INTERPRET=1`` on CPU tensors, against the reference in float64.

Triton chooses interpreter or compiler when a function is decorated, including its own ``tl.*`` helpers
at ``import triton``, so the variable must be set before triton is first imported. When this module is
collected before anything imported triton and there is no CUDA device, it imports triton (and our
kernels) with the variable set, then restores the environment so auto never picks triton on the CPU
elsewhere in the session. Otherwise (triton already imported compiled, or a GPU session that must keep
compiled triton) the in-process tests skip and ``test_in_a_fresh_interpreter`` re-runs this file in a
subprocess with ``TRITON_INTERPRET=1``.

Shapes are small and deliberately not multiples of the block sizes (interpreter configs: GEMM 16x32x64
tiles, GEMV 16x64): M = 1..4, 19; N = 40, 37; K = 96, 100.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

if importlib.util.find_spec("triton") is None:  # not importorskip: importing triton now would fix its mode
    pytest.skip("triton is not installed", allow_module_level=True)

from compress.core.errors import CompressError  # noqa: E402
from compress.core.packing import PackedWeight, pack_weight  # noqa: E402
from compress.core.scheme import QuantScheme  # noqa: E402
from compress.kernels.quant_linear import QuantLinear  # noqa: E402
from compress.kernels.reference import dequant_matmul_reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _triton_interp import import_interpreted, interpret_env, rerun_interpreted  # noqa: E402, F401

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, -1)


INTERPRETED = import_interpreted("compress.kernels.triton_gemm")
in_process = pytest.mark.skipif(not INTERPRETED, reason="triton was imported compiled; runs in a subprocess")


@pytest.mark.skipif(INTERPRETED, reason="this process interprets triton; the tests below ran here")
def test_in_a_fresh_interpreter() -> None:
    rerun_interpreted(__file__)


def _packed(
    bits: int, group: int, sym: bool, act_order: bool, n: int = 40, k: int = 96, scale_dtype=torch.float32
) -> PackedWeight:
    gen = torch.Generator().manual_seed(bits * 1000 + group * 10 + sym * 2 + act_order)
    w = torch.randn(n, k, generator=gen)
    scheme = QuantScheme(bits, group, sym)
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(k, generator=gen) // scheme.effective_group_size(k)).to(torch.int32)
    return pack_weight(w, scheme, g_idx=g_idx, scale_dtype=scale_dtype)


def _run(p: PackedWeight, x: Tensor, bias: Tensor | None, mode: str = "auto") -> Tensor:
    from compress.kernels.triton_gemm import dequant_matmul_triton

    s = p.scheme
    return dequant_matmul_triton(
        x, p.weight_packed, p.weight_scale, p.weight_zero_point, p.weight_g_idx, s.bits, s.group_size,
        p.out_features, p.in_features, bias, mode=mode,
    )  # fmt: skip


def _expected(p: PackedWeight, x: Tensor, bias: Tensor | None) -> Tensor:
    s = p.scheme
    return dequant_matmul_reference(
        x.double(), p.weight_packed, p.weight_scale.double(), p.weight_zero_point, p.weight_g_idx, s.bits,
        s.group_size, s.symmetric, p.out_features, p.in_features, None if bias is None else bias.double(),
    )  # fmt: skip


def _rel_err(y: Tensor, ref: Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@in_process
@pytest.mark.parametrize("act_order", [False, True], ids=["", "gidx"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
def test_gemm_and_gemv_match_reference(bits: int, group: int, sym: bool, act_order: bool) -> None:
    p = _packed(bits, group, sym, act_order)
    bias = torch.randn(40)
    for m, mode in ((19, "auto"), (3, "gemm"), (3, "auto"), (1, "auto")):  # auto: GEMV for m <= 4
        x = torch.randn(m, 96)
        y = _run(p, x, bias if m != 3 else None, mode)
        assert y.dtype == torch.float32 and y.shape == (m, 40)
        err = _rel_err(y, _expected(p, x, bias if m != 3 else None))
        assert err < 1e-5, f"m={m} mode={mode}: relative error {err:.2e}"


@in_process
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("group", [20, -1], ids=lambda g: f"g{g}")
def test_odd_shapes(bits: int, group: int) -> None:
    """N=37 (3-bit zero points straddle words), K=100 (the last packed word is partly padding)."""
    p = _packed(bits, group, False, False, n=37, k=100)
    for m in (2, 5):
        x = torch.randn(m, 100)
        assert _rel_err(_run(p, x, None), _expected(p, x, None)) < 1e-5


@in_process
@pytest.mark.parametrize("bits", [3, 4, 8], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("act_order", [False, True], ids=["", "gidx"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_activations(dtype: torch.dtype, act_order: bool, bits: int) -> None:
    """Half x and half scales; output in x.dtype; fp32 accumulation keeps it within half rounding."""
    p = _packed(bits, 32, False, act_order, scale_dtype=dtype)
    bias = torch.randn(40).to(dtype)
    bound = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for m in (19, 2):
        x = torch.randn(m, 96).to(dtype)
        y = _run(p, x, bias)
        assert y.dtype == dtype
        err = _rel_err(y, _expected(p, x, bias))
        assert err < bound, f"m={m}: relative error {err:.2e}"


@in_process
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"w{b}")
def test_gemv_agrees_with_gemm(bits: int) -> None:
    p = _packed(bits, 32, False, True)
    for m in (1, 2, 3, 4):
        x = torch.randn(m, 96)
        gemv, gemm = _run(p, x, None, "gemv"), _run(p, x, None, "gemm")
        torch.testing.assert_close(gemv, gemm, rtol=1e-5, atol=1e-5)


@in_process
def test_quant_linear_on_the_triton_path() -> None:
    from compress.kernels.paths import _pick
    from compress.kernels.triton_path import TRITON

    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    layer = QuantLinear.from_linear(lin, QuantScheme(4, 32, False))
    assert TRITON.unsupported(layer) is None
    layer.kernel = _pick(layer, "triton", "fc")
    x = torch.randn(2, 3, 96)
    y = layer(x)
    assert y.shape == (2, 3, 40)
    ref = _expected(layer.packed(), x.reshape(6, 96), layer.bias.detach()).reshape(2, 3, 40)
    assert _rel_err(y, ref) < 1e-5
    assert layer(torch.randn(0, 96)).shape == (0, 40)
    with pytest.raises(CompressError, match="float64"):
        layer(x.double())


@in_process
def test_never_chosen_on_cpu_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.kernels.paths import _pick
    from compress.kernels.triton_path import TRITON

    monkeypatch.delenv("TRITON_INTERPRET")
    layer = QuantLinear.from_linear(nn.Linear(64, 8), QuantScheme(4, 32))
    assert "CUDA" in (TRITON.unsupported(layer) or "")
    assert _pick(layer, "auto", "fc").name != "triton"
    with pytest.raises(CompressError, match="kernel triton cannot run layer fc"):
        _pick(layer, "triton", "fc")
