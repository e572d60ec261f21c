"""W8A8-int8: int8 per-channel weights times int8 per-token dynamic activations.

What compressed-tensors' ``W8A8`` preset (and llm-compressor) describe, and what its own forward computes
(``quantization/lifecycle/forward.py`` + ``utils/helpers.calculate_qparams`` in the installed 0.20): per
input row (token), ``scale = absmax / ((qmax - qmin) / 2)`` = ``absmax / 127.5`` (a zero row gets the
dtype's eps), ``q = clamp(round(x / scale), -128, 127)``, and the layer multiplies ``q * scale`` by the
dequantized weight. Nothing is calibrated: the scales exist only at run time.

Two ways to compute it, both here:

- the reference (``fake_quantize_input`` then the weight-only reference matmul): ``QuantLinear.forward``
  applies it for every kernel path that does not quantize inputs itself (reference, dense, the sweep's
  cached weight), so any path gives the W8A8 numbers, never silently float activations;
- ``Int8ActPath`` (``int8``, CPU): ``torch._int_mm`` on the int8 codes (exact int32 accumulation), then
  ``acc * token_scale ⊗ weight_scale + bias`` in float32. It differs from the reference only by the
  float rounding of that final rescale versus the reference's float32 sum of dequantized products
  (relative ~1e-6). ``_int_mm`` on CPU in torch 2.13 takes every shape we tried (M = 1, odd K and N);
  a shape or device it refuses at run time falls back to the reference. Speed: torch 2.13's CPU ``_int_mm``
  is not a tuned GEMM (about 20x slower than the fp32 matmul at 2048 x 1024 x 1024 on a 2-core AVX2 host,
  ``benchmarks/activations.py``), so ``kernel=auto`` (which times every path against dense) gives these
  layers the dense path, which still quantizes the input per token; ``kernel=int8`` forces this one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.qargs import QuantArgs
from compress.core.scheme import QuantScheme
from compress.kernels.fp8_act import fake_quantize_fp8, is_fp8_input
from compress.kernels.paths import KernelPath, register_path

if TYPE_CHECKING:
    from compress.kernels.quant_linear import QuantLinear

INT8_FORMATS = ("int-quantized", "naive-quantized")


def is_int8_per_token(args: QuantArgs | None) -> bool:
    return args is not None and args.is_int8_per_token


def is_w8a8_int8(scheme: QuantScheme | None) -> bool:
    """int8 symmetric per-channel weights and int8 symmetric per-token dynamic inputs."""
    if scheme is None or scheme.weights is None:
        return False
    w = scheme.weights
    return w.type == "int" and w.num_bits == 8 and w.strategy == "channel" and w.symmetric \
        and is_int8_per_token(scheme.input_activations)


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes of ``x`` (same shape) and float32 scales ``[..., 1]``, one per row of the last dim."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.5
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    q = torch.clamp(torch.round(xf / scale), -128, 127).to(torch.int8)
    return q, scale


def fake_quantize_input(x: Tensor, args: QuantArgs, input_scale: Tensor | None = None) -> Tensor:
    """``x`` quantized and dequantized back (float32 math, result in ``x.dtype``): int8 per token here, FP8
    per token or with the layer's static ``input_scale`` in ``kernels/fp8_act.py``."""
    if is_fp8_input(args):
        return fake_quantize_fp8(x, args, input_scale)
    if not is_int8_per_token(args):
        raise CompressError(f"input activations {args.tag} are not run here (only int8 per-token dynamic, FP8 "
                            "per-token dynamic or FP8 per-tensor static)")
    q, scale = quantize_per_token(x)
    return (q.float() * scale).to(x.dtype)


def int8_matmul(x: Tensor, weight_t: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x`` [M, K] float, ``weight_t`` [K, N] int8 codes, ``weight_scale`` [N] float32: the W8A8 product in
    float32 through ``torch._int_mm``; RuntimeError when torch refuses the shape or device."""
    q, scale = quantize_per_token(x)
    acc = torch._int_mm(q, weight_t)
    out = acc.float() * scale * weight_scale
    return out if bias is None else out + bias.float()


class Int8ActPath(KernelPath):
    """``torch._int_mm`` for W8A8-int8 layers on the CPU (the int8 codes as stored, the scales in float32)."""

    name = "int8"
    formats = INT8_FORMATS
    devices = ("cpu",)
    quantizes_inputs = True
    """``QuantLinear.forward`` leaves the input as is: this path quantizes it itself."""

    def check(self, layer: QuantLinear) -> str | None:
        if layer.weight_scale.device.type != "cpu":
            return "it runs on the CPU only"
        if not is_w8a8_int8(layer.scheme):
            return f"it runs W8A8-int8 layers (int8 per-channel weights, int8 per-token inputs), not {layer.scheme.tag}"
        return None

    def prepare(self, layer: QuantLinear) -> None:
        layer.register_buffer("_int8_weight_scale", layer.weight_scale.float().reshape(-1), persistent=False)

    def forward(self, layer: QuantLinear, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        try:
            # the codes' own [out, in] storage seen as [in, out]: no copy, and torch's CPU _int_mm runs this
            # column-major operand about 2x faster than a row-major copy (measured on torch 2.13)
            out = int8_matmul(rows, layer.weight.t(), layer._int8_weight_scale, layer.bias)
        except RuntimeError:  # a shape or device _int_mm refuses: the reference numbers
            return reference_w8a8(layer, x)
        return out.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)


def reference_w8a8(layer: QuantLinear, x: Tensor) -> Tensor:
    """The oracle: per-token quantize-dequantize of ``x``, dequantized weight, float32 matmul."""
    xq = fake_quantize_input(x, layer.scheme.input_activations).float()  # type: ignore[arg-type]
    w = layer.dequantized_weight(torch.float32)
    b = None if layer.bias is None else layer.bias.float()
    return F.linear(xq, w, b).to(x.dtype)


INT8 = register_path(Int8ActPath(), auto_priority=100)
