"""LLM.int8() (Dettmers et al. 2022) run-time mixed decomposition for int8 per-channel weights.

For each forward, the input feature dimensions where any element reaches ``|x| >= threshold`` (6.0 in the
paper and bitsandbytes) are outliers: those columns are multiplied in the model's float dtype, the others go
through vector-wise int8 (per-token absmax of the non-outlier part, ``round(x / s)`` clamped to ±127, times the
int8 weight). Both halves use the same int8 weights (bitsandbytes multiplies its outlier columns by the
dequantized int8 weight too), so the product equals ``x̃ · Ŵᵀ`` where ``x̃`` keeps the outlier columns exact
and fake-quantizes the rest: that is what ``llm_int8_input`` returns, and the layer's ordinary weight path
then multiplies it.

Storage: compressed-tensors has no layout for a run-time decomposition, so an LLM.int8 export is an
ordinary W8A16 int8 checkpoint (symmetric per-channel int8 weights, the bytes LLM.int8 multiplies) plus an
extra ``quantization_config.llm_int8 = {"threshold": T}`` key that compressed-tensors ignores
(``extra: ignore``). ``compress.load`` reads it and runs the decomposition; every other reader computes
W8A16 on the same weights, which is at least as accurate (no activation rounding at all).
"""

from __future__ import annotations

import torch
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme

DEFAULT_THRESHOLD = 6.0
INT8_MAX = 127.0
CONFIG_KEY = "llm_int8"


def is_llm_int8_scheme(scheme: QuantScheme) -> bool:
    """Weight-only int8 symmetric per-channel: the weights LLM.int8() multiplies (vector-wise, per row)."""
    w = scheme.weights
    return scheme.input_activations is None and w is not None and w.type == "int" and w.num_bits == 8 \
        and w.symmetric and w.strategy == "channel"


def check_threshold(threshold: float) -> float:
    """A positive finite threshold (one-sentence refusal otherwise)."""
    value = float(threshold)
    if not value > 0 or value == float("inf"):
        raise CompressError(f"the LLM.int8() outlier threshold must be a positive number, got {threshold!r}")
    return value


def outlier_columns(rows: Tensor, threshold: float) -> Tensor:
    """Bool ``[K]``: input dimensions with any ``|x| >= threshold`` among ``rows [M, K]``."""
    return (rows.abs() >= threshold).any(dim=0)


def llm_int8_input(x: Tensor, threshold: float) -> Tensor:
    """``x`` with its non-outlier columns vector-wise int8 quantized and dequantized (float32 math, per-token
    scale ``absmax / 127`` over those columns, an all-zero row kept zero), its outlier columns unchanged;
    in ``x.dtype``."""
    rows = x.reshape(-1, x.shape[-1]).float()
    outliers = outlier_columns(rows, threshold)
    regular = rows.masked_fill(outliers, 0.0)
    scale = regular.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    quantized = torch.clamp(torch.round(regular / scale), -INT8_MAX, INT8_MAX) * scale
    mixed = torch.where(outliers, rows, quantized)
    return mixed.reshape(x.shape).to(x.dtype)
