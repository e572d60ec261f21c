"""QuantLinear and the compress::dequant_matmul op against the dequantized weight in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.core.errors import CompressError
from compress.core.packing import pack_weight
from compress.core.scheme import QuantScheme
from compress.kernels import QuantLinear, dequant_matmul, dequant_matmul_reference
from compress.kernels.ops import dequant_matmul_op

SCHEMES = [QuantScheme(4, 32), QuantScheme(3, 48, False), QuantScheme(8, -1), QuantScheme(2, 16, False)]


def _linear(in_f: int = 96, out_f: int = 13, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.tag)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_float64_linear(scheme: QuantScheme, bias: bool) -> None:
    lin = _linear(bias=bias)
    ql = QuantLinear.from_linear(lin, scheme)
    x = torch.randn(2, 5, 96, dtype=torch.float64)
    w64 = ql.dequantized_weight(torch.float64)
    expected = F.linear(x, w64, None if lin.bias is None else lin.bias.double())
    y = ql(x)
    assert y.dtype == torch.float64 and y.shape == (2, 5, 13)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    # the quantized layer approximates the original
    assert (w64 - lin.weight.double()).abs().max() < 0.5


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.tag)
def test_state_dict_is_the_checkpoint(scheme: QuantScheme) -> None:
    ql = QuantLinear.from_linear(_linear(), scheme)
    keys = set(ql.state_dict())
    expected = {"weight_packed", "weight_scale", "weight_shape", "bias"}
    if not scheme.symmetric:
        expected.add("weight_zero_point")
    assert keys == expected
    assert torch.equal(ql.state_dict()["weight_packed"], ql.packed().tensors("p")["p.weight_packed"])
    # an empty module of the same config loads it and computes the same thing
    fresh = QuantLinear(96, 13, scheme, bias=True, scale_dtype=ql.weight_scale.dtype)
    fresh.load_state_dict(ql.state_dict())
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), ql(x))


def test_scale_dtype_follows_linear_and_g_idx_buffer() -> None:
    assert QuantLinear.from_linear(_linear(), QuantScheme(4, 32)).weight_scale.dtype == torch.float32
    half = QuantLinear.from_linear(_linear(dtype=torch.bfloat16), QuantScheme(4, 32))
    assert half.weight_scale.dtype == torch.bfloat16
    forced = QuantLinear.from_linear(_linear(), QuantScheme(4, 32), scale_dtype=torch.float16)
    assert forced.weight_scale.dtype == torch.float16
    g_idx = (torch.argsort(torch.randperm(96)) // 32).to(torch.int32)
    ql = QuantLinear.from_linear(_linear(), QuantScheme(4, 32), g_idx=g_idx)
    assert "weight_g_idx" in ql.state_dict() and torch.equal(ql.weight_g_idx, g_idx)
    x = torch.randn(4, 96, dtype=torch.float64)
    torch.testing.assert_close(ql(x), F.linear(x, ql.dequantized_weight(torch.float64), ql.bias.double()))


def test_half_input_on_cpu_keeps_dtype() -> None:
    ql = QuantLinear.from_linear(_linear(dtype=torch.bfloat16), QuantScheme(4, 32))
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    y = ql(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), ql.dequantized_weight(), ql.bias.float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_wrapper_reference_and_op_agree() -> None:
    lin = _linear()
    s = QuantScheme(4, 32, symmetric=False)
    pw = pack_weight(lin.weight.detach(), s)
    x = torch.randn(7, 96)
    a = dequant_matmul(x, pw, lin.bias)
    b = dequant_matmul_reference(
        x, pw.weight_packed, pw.weight_scale, pw.weight_zero_point, None, 4, 32, False, 13, 96, lin.bias
    )
    assert torch.equal(a, b)


def test_op_passes_opcheck_and_compiles() -> None:
    ql = QuantLinear.from_linear(_linear(), QuantScheme(4, 32, symmetric=False))
    x = torch.randn(2, 96)
    args = (
        x,
        ql.weight_packed,
        ql.weight_scale,
        ql.weight_zero_point,
        None,
        4,
        32,
        False,
        13,
        96,
        ql.bias.detach(),
    )
    torch.library.opcheck(dequant_matmul_op, args, test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(ql, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), ql(x))


def test_wrong_input_width_and_bad_scheme() -> None:
    ql = QuantLinear.from_linear(_linear(), QuantScheme(4, 32))
    with pytest.raises(CompressError, match="95 features"):
        ql(torch.randn(2, 95))
    with pytest.raises(CompressError, match="not divisible by group size 64"):
        QuantLinear.from_linear(_linear(), QuantScheme(4, 64))
    with pytest.raises(CompressError):
        QuantLinear(96, 13, QuantScheme(5, 32), bias=False)
