"""W8A8-FP8: e4m3 input activations, quantized the way compressed-tensors' forward does (and vLLM serves).

compressed-tensors 0.20 (``quantization/lifecycle/forward.py``, ``forward_helpers._quantize_dequantize``,
``utils/helpers.calculate_qparams``) fake-quantizes a float input ``x`` of a layer with float args as
``q = clamp(x / s, -448, 448)`` cast to ``float8_e4m3fn`` (round to nearest even, saturating at the clamp),
then ``q * s``. The scale ``s`` is

- dynamic, strategy ``token`` (``FP8_DYNAMIC``): per token (per row of the last dim), ``absmax / 448``
  (``max(|min|, |max|) / ((448 - (-448)) / 2)``), a zero replaced by the dtype's eps, computed at run time;
- static, strategy ``tensor`` (the ``FP8`` preset): the layer's stored ``input_scale [1]`` (model dtype),
  calibrated here as the largest ``|x|`` the layer saw over the calibration set, divided by 448
  (``core/unpacked.stored_input_scale``; llm-compressor's ``static_minmax`` observer).

The math runs in float32 and the result is cast back to ``x.dtype``: for float32 models that is exactly the
reader's arithmetic (tests compare bit for bit); for bf16/fp16 compressed-tensors divides in the model dtype
while vLLM's ``scaled_fp8_quant`` multiplies by the reciprocal in float32, so the readers already disagree in
the last bit and we take the float32 side. The matmul that follows stays the weight's own path (dequantized
e4m3 weight, fp32 dense on the CPU): torch's ``_scaled_mm`` runs FP8 GEMMs only on some GPUs, and on the CPU
the dequantized product is what a reader computes anyway, so ``compress eval`` measures the deployed numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.qargs import QuantArgs
from compress.core.scheme import QuantScheme
from compress.core.unpacked import FP8_MAX, fp8_quant_dequant


def is_fp8_input(args: QuantArgs | None) -> bool:
    """e4m3 symmetric inputs, per token dynamic or per tensor static (the two compressed-tensors presets)."""
    return args is not None and args.type == "float" and args.num_bits == 8 and args.symmetric \
        and ((args.strategy == "token" and args.dynamic) or (args.strategy == "tensor" and not args.dynamic))


def is_w8a8_fp8(scheme: QuantScheme | None) -> bool:
    """e4m3 symmetric per-channel (or per-tensor) weights and e4m3 inputs (``is_fp8_input``)."""
    if scheme is None or scheme.weights is None:
        return False
    w = scheme.weights
    return w.type == "float" and w.num_bits == 8 and w.symmetric and w.strategy in ("channel", "tensor") \
        and is_fp8_input(scheme.input_activations)


def per_token_scale(x: Tensor) -> Tensor:
    """float32 ``[..., 1]``: each row's ``absmax / 448`` (eps for an all-zero row)."""
    scale = x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX
    return torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)


def fake_quantize_fp8(x: Tensor, args: QuantArgs, input_scale: Tensor | None = None) -> Tensor:
    """``x`` quantized to e4m3 and dequantized back (float32 math, result in ``x.dtype``): per token when
    ``args`` is dynamic, with the stored per-tensor ``input_scale`` when static."""
    if not is_fp8_input(args):
        raise CompressError(f"input activations {args.tag} are not FP8 per-token dynamic or per-tensor static")
    if args.dynamic:
        return fp8_quant_dequant(x, per_token_scale(x))
    if input_scale is None:
        raise CompressError("static FP8 input activations need the layer's calibrated input_scale")
    return fp8_quant_dequant(x, input_scale.reshape(1))
