"""THE storage contract: compressed-tensors ``pack-quantized`` tensors for one quantized Linear.

Verified against the installed compressed-tensors (0.20,
``compressors/pack_quantized/helpers.py`` ``pack_to_int32`` / ``unpack_from_int32`` and
``compressors/pack_quantized/base.py``); the compat tests re-check it against the package:

- codes are stored unsigned, ``u = q + 2^(b-1)``;
- packing is a *dense little-endian bit stream* per row: element ``k`` occupies bits
  ``[k*b, (k+1)*b)`` of the row's stream, word ``j`` holds stream bits ``[32j, 32j+32)`` LSB first.
  For b in {2, 4, 8} this is the familiar 32/b codes per word. For b = 3 a code may straddle two words
  (element 10 sits in bits 30-31 of word 0 and bit 0 of word 1): 32 codes fill exactly 3 words. Older
  compressed-tensors releases (and some other tools) pack ``32 // b`` = 10 three-bit codes per word
  with 2 wasted bits; FORMATS.md's column count ``ceil(in*b/32)`` agrees with the dense layout, which
  is what we write;
- ``weight_packed`` is int32 ``[out, ceil(in*b/32)]``, trailing bits zero;
- ``weight_zero_point`` (asymmetric group/channel only) holds ``zp + 2^(b-1)`` packed the same way but
  along the OUTPUT dim: int32 ``[ceil(out*b/32), n_groups]``;
- ``weight_shape`` is ``torch.tensor([out, in])`` (int64); ``weight_scale`` keeps the model dtype;
- ``weight_g_idx`` (int32 ``[in]``) is written by vLLM-era activation ordering ("group"); the installed
  package has removed that mode and no longer reads g_idx, but vLLM's readers still do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.primitives import compute_qparams, dequantize, quantize
from compress.core.scheme import QuantScheme
from compress.core.storage import WeightStorage

_MASK32 = 0xFFFFFFFF


def packed_size(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes of ``bits`` bits."""
    return math.ceil(n * bits / 32)


def pack_codes(q: Tensor, bits: int) -> Tensor:
    """Signed codes ``[rows, n]`` to int32 ``[rows, ceil(n*bits/32)]``, packed along dim 1."""
    if q.ndim != 2:
        raise CompressError(f"expected 2-D codes to pack, got shape {tuple(q.shape)}")
    rows, n = q.shape
    offset = 1 << (bits - 1)
    u = q.to(torch.int64) + offset
    if bool(((u < 0) | (u >= (1 << bits))).any()):
        raise CompressError(f"codes fall outside the signed {bits}-bit range")
    blocks = math.ceil(n / 32)
    u = torch.nn.functional.pad(u, (0, blocks * 32 - n)).reshape(rows, blocks, 32)
    words = torch.zeros(rows, blocks, bits, dtype=torch.int64, device=q.device)
    for k in range(32):
        start = k * bits
        word, shift = divmod(start, 32)
        words[:, :, word] |= (u[:, :, k] << shift) & _MASK32
        if shift + bits > 32:  # the code straddles into the next word (only when 32 % bits != 0)
            words[:, :, word + 1] |= u[:, :, k] >> (32 - shift)
    words = words.reshape(rows, blocks * bits)[:, : packed_size(n, bits)]
    # reinterpret the unsigned 32-bit pattern as int32 (two's complement)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``pack_codes``: int32 ``[rows, ceil(n*bits/32)]`` to signed int8 codes ``[rows, n]``."""
    if packed.ndim != 2 or packed.dtype != torch.int32:
        raise CompressError(f"expected 2-D int32 packed codes, got {packed.dtype} {tuple(packed.shape)}")
    rows, n_words = packed.shape
    if n_words != packed_size(n, bits):
        raise CompressError(f"{n_words} packed words cannot hold exactly {n} {bits}-bit codes")
    blocks = math.ceil(n / 32)
    words = packed.to(torch.int64) & _MASK32
    words = torch.nn.functional.pad(words, (0, blocks * bits - n_words)).reshape(rows, blocks, bits)
    mask = (1 << bits) - 1
    out = []
    for k in range(32):
        word, shift = divmod(k * bits, 32)
        v = words[:, :, word] >> shift
        if shift + bits > 32:
            v = v | (words[:, :, word + 1] << (32 - shift))
        out.append(v & mask)
    u = torch.stack(out, dim=-1).reshape(rows, blocks * 32)[:, :n]
    return (u - (1 << (bits - 1))).to(torch.int8)


def pack_zero_point(zero_point: Tensor, bits: int) -> Tensor:
    """Zero points ``[out, n_groups]`` to int32 ``[ceil(out*bits/32), n_groups]`` (packed along out)."""
    return pack_codes(zero_point.t(), bits).t().contiguous()


def unpack_zero_point(packed: Tensor, bits: int, out_features: int) -> Tensor:
    """Inverse of ``pack_zero_point``: int32 zero points ``[out, n_groups]``."""
    return unpack_codes(packed.t().contiguous(), bits, out_features).t().to(torch.int32).contiguous()


def unpackable(scheme: QuantScheme) -> str | None:
    """Why the pack-quantized layout cannot hold weights of ``scheme`` (None when it can): integer codes of
    2/3/4/8 bits with one scale per group or per output channel, and inputs either unquantized or int8 per
    token at run time (W4A8: the input args live in the config group only, no tensor of the layout holds them)."""
    w = scheme.weights
    if w is None:
        return "it stores quantized weights and this scheme has none"
    if w.type != "int":
        return f"it stores integer codes, not {w.type} ones"
    if w.strategy not in ("group", "channel"):
        return f"it stores one scale per group or per output channel, not per {w.strategy}"
    if scheme.input_activations is not None and not scheme.input_activations.is_int8_per_token:
        return (f"its layers quantize inputs only int8 per token at run time (W4A8), not "
                f"{scheme.input_activations.tag}")
    return None


def check_packable(scheme: QuantScheme) -> None:
    """``validate`` plus ``unpackable`` as one CompressError sentence."""
    scheme.validate()
    reason = unpackable(scheme)
    if reason is not None:
        raise CompressError(f"scheme {scheme.tag} cannot be stored as pack-quantized: {reason}")


def _fail(prefix: str, name: str, detail: str) -> CompressError:
    return CompressError(f"tensor {prefix}.{name} {detail}")


@dataclass
class PackedWeight(WeightStorage):
    """The checkpoint tensors of one quantized Linear, plus the scheme that gives them meaning."""

    weight_packed: Tensor
    weight_scale: Tensor
    weight_zero_point: Tensor | None
    weight_g_idx: Tensor | None
    weight_shape: Tensor
    scheme: QuantScheme

    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = (
        "weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")
    PERSISTENT: ClassVar[frozenset[str]] = frozenset(TENSOR_FIELDS)

    @property
    def out_features(self) -> int:
        return int(self.weight_shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight_shape[1])

    @property
    def scale(self) -> Tensor:
        return self.weight_scale

    @classmethod
    def empty(cls, out_features: int, in_features: int, scheme: QuantScheme, *, scale_dtype: torch.dtype,
              has_g_idx: bool = False, device: torch.device | str | None = None) -> PackedWeight:
        """Zeroed buffers of the checkpoint shapes (scales 1, g_idx the trivial order)."""
        check_packable(scheme)
        n_groups = scheme.n_groups(in_features)
        int32 = dict(dtype=torch.int32, device=device)
        return cls(
            weight_packed=torch.zeros(out_features, packed_size(in_features, scheme.bits), **int32),
            weight_scale=torch.ones(out_features, n_groups, dtype=scale_dtype, device=device),
            weight_zero_point=None if scheme.symmetric else torch.zeros(
                packed_size(out_features, scheme.bits), n_groups, **int32),
            weight_g_idx=torch.arange(in_features, **int32) // scheme.effective_group_size(in_features)
            if has_g_idx else None,
            weight_shape=torch.tensor([out_features, in_features], dtype=torch.int64, device=device),
            scheme=scheme,
        )

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero_point: Tensor | None, scheme: QuantScheme,
                   g_idx: Tensor | None = None) -> PackedWeight:
        """The checkpoint tensors of codes a solver produced (GPTQ, AutoRound), packed as they are: never
        re-derived from a dense weight, so the stored layer is the solved one. ``scale`` is stored as given
        (already in its storage dtype); ``zero_point`` is ignored when the scheme is symmetric."""
        check_packable(scheme)
        out_f, in_f = codes.shape
        return cls(
            weight_packed=pack_codes(codes, scheme.bits),
            weight_scale=scale.contiguous(),
            weight_zero_point=None if scheme.symmetric or zero_point is None
            else pack_zero_point(zero_point, scheme.bits),
            weight_g_idx=None if g_idx is None else g_idx.to(torch.int32).contiguous(),
            weight_shape=torch.tensor([out_f, in_f], dtype=torch.int64, device=codes.device),
            scheme=scheme,
        )

    @classmethod
    def from_tensors(cls, prefix: str, tensors: Mapping[str, Tensor], scheme: QuantScheme) -> PackedWeight:
        """Read and validate a layer's tensors; CompressError naming the first tensor that is wrong."""
        check_packable(scheme)

        def get(name: str, required: bool) -> Tensor | None:
            t = tensors.get(f"{prefix}.{name}")
            if t is None and required:
                raise _fail(prefix, name, "is missing")
            return t

        shape = get("weight_shape", True)
        if shape.shape != (2,) or shape.dtype.is_floating_point or shape.dtype == torch.bool:
            raise _fail(prefix, "weight_shape", f"must be 2 integers, got {shape.dtype} {tuple(shape.shape)}")
        out_f, in_f = (int(v) for v in shape.tolist())
        if out_f <= 0 or in_f <= 0:
            raise _fail(prefix, "weight_shape", f"holds a non-positive size [{out_f}, {in_f}]")
        n_groups = scheme.n_groups(in_f)

        def expect(name: str, t: Tensor, dtype_ok: bool, dtype_desc: str, shp: tuple[int, ...]) -> None:
            if not dtype_ok:
                raise _fail(prefix, name, f"has dtype {t.dtype}, expected {dtype_desc}")
            if tuple(t.shape) != shp:
                raise _fail(
                    prefix, name, f"has shape {tuple(t.shape)}, expected {shp} for scheme {scheme.tag}"
                )

        packed = get("weight_packed", True)
        expect(
            "weight_packed",
            packed,
            packed.dtype == torch.int32,
            "int32",
            (out_f, packed_size(in_f, scheme.bits)),
        )
        scale = get("weight_scale", True)
        expect("weight_scale", scale, scale.dtype.is_floating_point, "a float dtype", (out_f, n_groups))
        zp = get("weight_zero_point", not scheme.symmetric)
        if scheme.symmetric:
            zp = None  # a symmetric reader ignores stray zero points, as compressed-tensors does
        else:
            expect(
                "weight_zero_point",
                zp,
                zp.dtype == torch.int32,
                "int32",
                (packed_size(out_f, scheme.bits), n_groups),
            )
        g_idx = get("weight_g_idx", False)
        if g_idx is not None:
            expect("weight_g_idx", g_idx, g_idx.dtype == torch.int32, "int32", (in_f,))
            if in_f and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
                raise _fail(prefix, "weight_g_idx", f"holds group ids outside 0..{n_groups - 1}")
        return cls(packed, scale, zp, g_idx, shape, scheme)

    def unpack(self) -> tuple[Tensor, Tensor, Tensor]:
        """(signed int8 codes ``[out, in]``, float32 scale, int32 zero point ``[out, n_groups]``)."""
        codes = unpack_codes(self.weight_packed, self.scheme.bits, self.in_features)
        scale = self.weight_scale.float()
        if self.weight_zero_point is None:
            zp = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        else:
            zp = unpack_zero_point(self.weight_zero_point, self.scheme.bits, self.out_features)
        return codes, scale, zp

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight a reader reconstructs, ``[out, in]``."""
        codes, scale, zp = self.unpack()
        return dequantize(codes, scale, zp, self.scheme, self.weight_g_idx, dtype=dtype)


SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Float dtypes a ``weight_scale`` may be stored in."""


def scale_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are stored in by default: the layer's own float dtype (compressed-tensors keeps them
    in the dtype they were observed in), float32 for anything else."""
    return weight_dtype if weight_dtype in SCALE_DTYPES else torch.float32


def pack_weight(
    w: Tensor,
    scheme: QuantScheme,
    *,
    scale: Tensor | None = None,
    zero_point: Tensor | None = None,
    g_idx: Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> PackedWeight:
    """Quantize ``w`` ``[out, in]`` with the given (or min-max) qparams and pack it.

    The scale is rounded to ``scale_dtype`` *before* quantizing so the codes are the ones a reader,
    who only sees the stored scale, would have produced; a scale that underflows to 0 in the storage
    dtype is replaced by that dtype's smallest normal number to keep dequantization finite.
    """
    check_packable(scheme)
    if w.ndim != 2:
        raise CompressError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if scale is None:
        scale, computed_zp = compute_qparams(w, scheme, g_idx=g_idx)
        zero_point = computed_zp if zero_point is None else zero_point
    n_groups = scheme.n_groups(in_f)
    if tuple(scale.shape) != (out_f, n_groups):
        raise CompressError(f"scale has shape {tuple(scale.shape)}, expected {(out_f, n_groups)}")
    stored = scale.detach().to(scale_dtype)
    stored = torch.where(stored == 0, torch.full_like(stored, torch.finfo(scale_dtype).tiny), stored)
    if scheme.symmetric:
        zp = None
    else:
        if zero_point is None:
            raise CompressError("asymmetric packing needs a zero point when a scale is given")
        if tuple(zero_point.shape) != (out_f, n_groups):
            raise CompressError(
                f"zero point has shape {tuple(zero_point.shape)}, expected {(out_f, n_groups)}"
            )
        zp = zero_point.detach().float().round().clamp(scheme.qmin, scheme.qmax).to(torch.int32)
    codes = quantize(w.detach(), stored.float(), zp, scheme, g_idx)
    return PackedWeight(
        weight_packed=pack_codes(codes, scheme.bits),
        weight_scale=stored.contiguous(),
        weight_zero_point=None if zp is None else pack_zero_point(zp, scheme.bits),
        weight_g_idx=None if g_idx is None else g_idx.detach().to(torch.int32).contiguous(),
        weight_shape=torch.tensor([out_f, in_f], dtype=torch.int64, device=w.device),
        scheme=scheme,
    )
