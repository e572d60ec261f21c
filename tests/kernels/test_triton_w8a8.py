"""The triton W8A8 kernel (int8 and FP8) under ``TRITON_INTERPRET=1`` on CPU tensors, against the reference.

int8: the int32 accumulators are exact, so the kernel must equal ``codes @ codesᵀ · s_x · s_w`` to float32
rounding of the epilogue. FP8: e4m3 products are exact in float32, only the summation order differs from
the reference's float32 matmul.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

if importlib.util.find_spec("triton") is None:  # not importorskip: importing triton now would fix its mode
    pytest.skip("triton is not installed", allow_module_level=True)

from compress.codecs import quantize_linear  # noqa: E402
from compress.core.errors import CompressError  # noqa: E402
from compress.core.scheme import QuantScheme  # noqa: E402
from compress.kernels.paths import apply_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _triton_interp import import_interpreted, interpret_env, rerun_interpreted  # noqa: E402, F401

INTERPRETED = import_interpreted("compress.kernels.triton_w8a8")
in_process = pytest.mark.skipif(not INTERPRETED, reason="triton was imported compiled; runs in a subprocess")
SCHEMES = {"int8": (QuantScheme.w8a8_int8, "int-quantized"),
           "fp8-dynamic": (QuantScheme.w8a8_fp8, "float-quantized"),
           "fp8-static": (lambda: QuantScheme.w8a8_fp8(static=True), "float-quantized")}


@pytest.mark.skipif(INTERPRETED, reason="this process interprets triton; the tests below ran here")
def test_in_a_fresh_interpreter() -> None:
    rerun_interpreted(__file__)


def _layer(kind: str, n: int = 40, k: int = 72, bias: bool = True):
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias)
    make, fmt = SCHEMES[kind]
    extra = {"input_absmax": torch.tensor(2.5)} if kind == "fp8-static" else {}
    return quantize_linear(linear, make(), format=fmt, **extra)


def _reference(layer, x):
    """The layer on the reference path: inputs fake-quantized as the scheme says, dequantized weight, fp32."""
    kernel, layer.kernel = layer.kernel, None
    try:
        return layer(x)
    finally:
        layer.kernel = kernel


def _on_triton(layer):
    from compress.kernels import triton_w8a8

    assert triton_w8a8.TRITON_W8A8.check(layer) is None
    layer.kernel = triton_w8a8.TRITON_W8A8
    return layer


@in_process
@pytest.mark.parametrize("kind", list(SCHEMES))
@pytest.mark.parametrize(("rows", "bias"), [(1, True), (5, False), (37, True)])
def test_matches_the_reference(kind, rows, bias):
    layer = _layer(kind, bias=bias)
    x = torch.randn(rows, 72) * 2
    expected = _reference(layer, x)
    got = _on_triton(layer)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@in_process
def test_int8_accumulates_exactly():
    from compress.kernels.int8_act import quantize_per_token
    from compress.kernels.triton_w8a8 import w8a8_matmul_triton

    layer = _layer("int8", n=33, k=200, bias=False)
    x = torch.randn(9, 200) * 5
    q, s = quantize_per_token(x)
    exact = (q.double() @ layer.weight.double().t()) * s.double() * layer.weight_scale.double().reshape(1, -1)
    got = w8a8_matmul_triton(layer, x)
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-6)


@in_process
def test_batched_input_and_static_saturation():
    layer = _on_triton(_layer("fp8-static"))
    x = torch.randn(2, 3, 72)
    x[0, 0, 0] = 1e3  # beyond the calibrated range: saturates like the reference
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-5)


@in_process
def test_auto_picks_it_only_for_w8a8():
    model = nn.Sequential(_layer("int8"), _layer("fp8-dynamic"))
    counts = apply_kernel(model, "triton-w8a8")
    assert counts == {"triton-w8a8": 2}
    weight_only = quantize_linear(nn.Linear(72, 40), QuantScheme.fp8(), format="float-quantized")
    with pytest.raises(CompressError, match="triton-w8a8"):
        apply_kernel(nn.Sequential(weight_only), "triton-w8a8")


@in_process
def test_refuses_integer_inputs():
    layer = _on_triton(_layer("int8"))
    with pytest.raises(CompressError, match="float16, bfloat16 or float32"):
        layer.kernel.forward(layer, torch.ones(2, 72, dtype=torch.int32))
