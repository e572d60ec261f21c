"""``float-quantized``: FP8 (e4m3) weights, one scale per output channel or per tensor (W8A16-FP8), and
W8A8-FP8: the same weights with e4m3 input activations, per token at run time (``FP8_DYNAMIC``) or with one
calibrated per-tensor ``P.input_scale`` (the ``FP8`` preset's static inputs; ``kernels/fp8_act.py``).

The codes are stored one per element as ``float8_e4m3fn`` in ``P.weight`` with ``P.weight_scale`` in the
model dtype (``core/unpacked.py``, the layout compressed-tensors shares between its naive/int/float
compressors); a reader computes ``w = q * s``. Numerics follow compressed-tensors
(``quantization/utils/helpers.py`` ``calculate_qparams``): symmetric only, ``s = absmax / 448`` (448 is
the largest e4m3 value; the package divides the absmax by half the code range, ``(448 - (-448)) / 2``), a
zero scale replaced by eps, and ``q = clamp(w / s, -448, 448)`` cast to e4m3 (round to nearest even).

As with ``pack_weight``, the scale is rounded to its storage dtype *before* the codes are computed, so the
codes are the ones a reader, who sees only the stored scale, would have produced. The forward is the
reference dequantize-then-matmul (``kernels/ops.py``); under ``kernel=auto`` the layer runs dense from a
weight dequantized once at load (no packed kernel serves FP8 on the CPU), so it is never slower than dense.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from compress.codecs.base import (
    NO_ACTIVATIONS,
    HeaderMeta,
    StorageCodec,
    expect_headers,
    header_fail,
    register,
)
from compress.core.errors import CompressError
from compress.core.packing import scale_dtype_for
from compress.core.scheme import QuantScheme
from compress.core.unpacked import (  # noqa: F401  (FP8_MAX, fp8_scale, fp8_codes: their historic home)
    FP8,
    FP8_MAX,
    UnpackedWeight,
    fp8_codes,
    fp8_scale,
    scale_shape,
    stored_input_scale,
)
from compress.kernels.fp8_act import is_fp8_input

STRATEGIES = ("channel", "tensor")


class FloatQuantizedCodec(StorageCodec):
    name = "float-quantized"
    marker = "weight_scale"
    leaves = ("weight", "weight_scale", "input_scale")
    code_leaves = ("weight",)
    scale_leaf = "weight_scale"
    storage_cls = UnpackedWeight

    def claims(self, prefix: str, names: set[str]) -> bool:
        return f"{prefix}.weight" in names and f"{prefix}.weight_packed" not in names

    def unsupported(self, scheme: QuantScheme | None) -> str | None:
        w = None if scheme is None else scheme.weights
        if w is None:
            return "it stores quantized weights and this scheme has none"
        inputs = scheme.input_activations  # type: ignore[union-attr]
        if inputs is not None and not is_fp8_input(inputs):
            return NO_ACTIVATIONS
        if w.type != "float" or w.num_bits != 8:
            return f"it holds 8-bit float (e4m3) codes, not {w.num_bits}-bit {w.type} ones"
        if w.strategy not in STRATEGIES:
            return f"its scales are per channel or per tensor, not per {w.strategy}"
        if not w.symmetric:
            return "FP8 codes are symmetric (no zero points)"
        return None

    def encode_storage(self, weight: Tensor, scheme: QuantScheme, *, scale: Tensor | None = None,
                       scale_dtype: torch.dtype | None = None, input_absmax: Tensor | float | None = None,
                       **unused: Any) -> UnpackedWeight:
        """``input_absmax``: the calibration's largest ``|x|`` of the layer's inputs, required (and only taken)
        with static input activations; stored as ``input_scale = absmax / 448`` in the scale dtype."""
        self.check(scheme)
        if any(v is not None for v in unused.values()):
            raise CompressError(f"{self.name} takes a scale only (no zero points, no g_idx)")
        if scheme.has_static_inputs != (input_absmax is not None):
            raise CompressError("static FP8 input activations need the calibrated input absmax, and only they take it"
                                if scheme.has_static_inputs else
                                f"scheme {scheme.tag} has no static input scale to store")
        if weight.ndim != 2:
            raise CompressError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
        dtype = scale_dtype or scale_dtype_for(weight.dtype)
        scale = fp8_scale(weight, scheme) if scale is None else scale
        want = scale_shape(scheme, *weight.shape)
        if tuple(scale.shape) != want:
            raise CompressError(f"scale has shape {tuple(scale.shape)}, expected {want}")
        stored = scale.detach().to(dtype)
        stored = torch.where(stored == 0, torch.full_like(stored, torch.finfo(dtype).tiny), stored).contiguous()
        input_scale = None if input_absmax is None else stored_input_scale(input_absmax, dtype).to(stored.device)
        return UnpackedWeight(fp8_codes(weight, stored, scheme), stored, None, None, scheme, input_scale)

    def config(self, scheme: QuantScheme | None, *, observer: str | None = "minmax", **_: Any) -> dict[str, Any]:
        return self.scheme_group(scheme, observer=observer)

    def header_shape(self, prefix: str, meta: HeaderMeta, scheme: QuantScheme | None,
                     values: Mapping[str, list[int]]) -> tuple[int, int]:
        assert scheme is not None
        self.check(scheme, f"layer {prefix}: ")
        dtype, shape = meta[f"{prefix}.weight"]
        if dtype != "F8_E4M3" or len(shape) != 2:
            raise header_fail(prefix, "weight", f"is {dtype} {shape}, expected 2-D F8_E4M3 codes")
        expected = {"weight_scale": list(scale_shape(scheme, *shape))}
        if scheme.has_static_inputs:
            expected["input_scale"] = [1]
        expect_headers(prefix, meta, expected, f"scheme {scheme.tag}")
        return shape[0], shape[1]


FLOAT_QUANTIZED = register(FloatQuantizedCodec())
