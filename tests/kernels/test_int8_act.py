"""W8A8-int8 runtime: per-token scales, the ``torch._int_mm`` path against the reference, the codec round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.codecs import codec, quantize_linear
from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme
from compress.kernels import int8_act
from compress.kernels.int8_act import INT8, fake_quantize_input, quantize_per_token, reference_w8a8
from compress.kernels.paths import apply_kernel

W8A8 = QuantScheme.w8a8_int8()


def _layer(in_f: int = 64, out_f: int = 48, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    return quantize_linear(nn.Linear(in_f, out_f, bias=bias), W8A8, format="int-quantized")


def test_per_token_scale_math():
    x = torch.tensor([[1.0, -2.55, 0.5], [0.0, 0.0, 0.0], [127.5, 3.0, -1.0]])
    q, scale = quantize_per_token(x)
    assert torch.allclose(scale[:, 0], torch.tensor([2.55 / 127.5, torch.finfo(torch.float32).eps, 1.0]))
    assert q.dtype == torch.int8
    assert q[0].tolist() == [50, -128, 25] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [127, 3, -1]
    # the row's absmax maps to +-127.5 -> clamped at 127 / -128, as compressed-tensors' calculate_qparams
    assert torch.equal(fake_quantize_input(x, W8A8.input_activations)[2], torch.tensor([127.0, 3.0, -1.0]))


def test_matches_compressed_tensors_dynamic_token():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    args = QuantizationArgs(**W8A8.input_activations.to_dict())
    x = torch.randn(2, 7, 64)
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=nn.Linear(1, 1))
    theirs = fake_quantize(x, scale, zp, args)
    assert torch.allclose(fake_quantize_input(x, W8A8.input_activations), theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 64), (3, 20, 64), (17, 64), (300, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_int_mm_path_matches_reference(shape, bias):
    layer = _layer(bias=bias)
    x = torch.randn(*shape) * 3
    ref = layer(x)  # no kernel: the reference (input quantized in QuantLinear.forward)
    assert torch.allclose(ref, reference_w8a8(layer, x), rtol=0, atol=1e-6)
    INT8.prepare(layer)
    layer.kernel = INT8
    fast = layer(x)
    # int32 accumulation is exact; only the final float32 rescale differs from the reference's fp32 sum
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_odd_shapes_and_fallback(monkeypatch):
    layer = _layer(in_f=72, out_f=40)
    x = torch.randn(5, 72)
    ref = layer(x)
    INT8.prepare(layer)
    layer.kernel = INT8
    assert torch.allclose(layer(x), ref, rtol=0, atol=1e-5)

    def refuse(*_):
        raise RuntimeError("shape refused")

    monkeypatch.setattr(int8_act.torch, "_int_mm", refuse)
    assert torch.equal(layer(x), ref)


def test_dense_path_quantizes_inputs_too():
    layer = _layer()
    x = torch.randn(4, 64)
    ref = layer(x)
    apply_kernel(nn.Sequential(layer), "dense")
    assert torch.allclose(layer(x), ref, rtol=0, atol=1e-5)
    apply_kernel(nn.Sequential(layer), "int8")
    assert layer.kernel is INT8


def test_int8_path_refuses_weight_only():
    layer = quantize_linear(nn.Linear(64, 48), QuantScheme(8, -1), format="int-quantized")
    assert "W8A8" in INT8.unsupported(layer)
    with pytest.raises(CompressError, match="kernel int8 cannot run"):
        apply_kernel(nn.Sequential(layer), "int8")


def test_codec_round_trip_and_config():
    layer = _layer()
    c = codec("int-quantized")
    tensors = {f"p.{k}": v for k, v in c.encode(layer.dequantized_weight(), W8A8, scale=layer.weight_scale).items()}
    assert set(tensors) == {"p.weight", "p.weight_scale"} and tensors["p.weight"].dtype == torch.int8
    assert torch.equal(tensors["p.weight"], layer.weight)
    rebuilt = c.rebuild("p", tensors, W8A8, layer.bias)
    x = torch.randn(3, 64)
    assert torch.equal(rebuilt(x), layer(x))
    group = c.config(W8A8)
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    theirs = QuantizationScheme(targets=["Linear"], **group)
    preset = PRESET_SCHEMES["W8A8"]
    for side in ("weights", "input_activations"):
        mine, ref = getattr(theirs, side), preset[side]
        for field in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic"):
            assert getattr(mine, field) == getattr(ref, field), (side, field)


def test_other_activation_schemes_refused():
    from compress.core.qargs import QuantArgs

    static = QuantScheme(weights=W8A8.weights, input_activations=QuantArgs(strategy="tensor"))
    with pytest.raises(CompressError, match="W8A8-int8"):
        codec("int-quantized").check(static)


def test_auto_picks_int8_or_dense_and_keeps_w8a8_numbers():
    layer = _layer(in_f=256, out_f=256)
    x = torch.randn(4, 256)
    ref = layer(x)
    counts = apply_kernel(nn.Sequential(layer), "auto")
    assert set(counts) <= {"int8", "dense"} and layer.kernel is not None
    assert torch.allclose(layer(x), ref, rtol=0, atol=1e-5)
