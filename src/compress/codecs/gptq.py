"""The GPTQ layout (``quant_method: gptq``): the pack-quantized integer codes, re-arranged per layer.

FORMATS.md, GPTQ section. Per quantized Linear ``P`` (weight ``[out, in]``, unsigned codes ``u = q + 2^(b-1)``):

- ``P.qweight`` int32 ``[in*b/32, out]``: codes packed along the input dim, LSB first. Our compressed-tensors
  ``weight_packed`` is the same dense little-endian bit stream along the input dim, so ``qweight`` is exactly
  ``weight_packed.T`` for every width (for 3 bits this is AutoGPTQ/GPTQModel's 32-codes-in-3-words layout,
  checked against a transcription of their packing loop in the tests);
- ``P.qzeros`` int32 ``[n_groups, out*b/32]``: unsigned zero points packed along the output dim;
- ``P.scales`` fp16 ``[n_groups, out]``; ``P.g_idx`` int32 ``[in]`` (always written); ``P.bias`` as is.

The zero-point trap: ``checkpoint_format: "gptq"`` (v1) stores ``zero - 1``. GPTQModel converts by adding or
subtracting 0x11111111 to whole int32 words, which borrows across neighbouring codes when a zero is 0. We do
the -1 (and the +1 on read) per element, before packing / after unpacking, and write v1 only for symmetric
schemes (zero = 2^(b-1) >= 1, so no element can borrow); asymmetric goes out as ``gptq_v2`` (zeros as is).

In memory a GPTQ layer is a pack-quantized ``QuantLinear`` (same codes), so this codec reads and writes
through ``PackedWeight``; the model-level files (``quantize_config.json``, whole-model conversion) are
``export/gptq.py``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from compress.codecs.base import HeaderMeta, StorageCodec, expect_headers, register
from compress.codecs.pack_quantized import PACK_QUANTIZED
from compress.core.errors import CompressError
from compress.core.packing import PackedWeight, pack_codes, unpack_codes, unpackable
from compress.core.scheme import SUPPORTED_BITS, QuantScheme
from compress.kernels.quant_linear import QuantLinear

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def checkpoint_format(scheme: QuantScheme) -> str:
    """v1 only where it is safe: symmetric zeros are never 0, so "minus 1" cannot borrow in any reader."""
    return "gptq" if scheme.symmetric else "gptq_v2"


def check_expressible(name: str, scheme: QuantScheme, out_features: int, in_features: int) -> None:
    """Refuse (one sentence) a layer whose shape the GPTQ tensors cannot hold without padding.

    GPTQ readers size ``qweight`` as ``in // (32/b)`` rows and ``qzeros`` as ``out // (32/b)`` columns and
    have no ``weight_shape`` to strip padding, so both widths must fill whole int32 words (3 bits: multiples
    of 32), and groups must tile the input exactly.
    """
    scheme.validate()
    unit = 32 if scheme.bits == 3 else 32 // scheme.bits
    if in_features % unit or out_features % unit:
        raise CompressError(f"layer {name} is {out_features}x{in_features}; the GPTQ layout needs both dims to be "
                            f"multiples of {unit} at {scheme.bits} bits, so export it as compressed-tensors")
    if not scheme.per_channel and in_features % scheme.group_size:
        raise CompressError(f"layer {name} has {in_features} inputs, not a multiple of group size "
                            f"{scheme.group_size}, which the GPTQ layout cannot express")


def _fp16_scales(name: str, scale: Tensor) -> tuple[Tensor, bool]:
    """Scales as GPTQ stores them (fp16); (tensor, lost precision?). Overflow or underflow is refused."""
    half = scale.to(torch.float16)
    if not bool(torch.isfinite(half).all()) or bool(((half == 0) & (scale != 0)).any()):
        raise CompressError(f"tensor {name}.weight_scale has values outside the float16 range that the GPTQ "
                            "layout stores scales in")
    return half, not torch.equal(half.to(scale.dtype), scale)


def layer_to_gptq(name: str, tensors: Mapping[str, Tensor], scheme: QuantScheme) -> tuple[dict[str, Tensor], bool]:
    """One layer's compressed-tensors entries → GPTQ entries; also whether its scales lost precision."""
    shape = tensors[f"{name}.weight_shape"]
    out_f, in_f = (int(v) for v in shape.tolist())
    check_expressible(name, scheme, out_f, in_f)
    bits = scheme.bits
    offset = 1 << (bits - 1)
    n_groups = scheme.n_groups(in_f)
    scales, lossy = _fp16_scales(name, tensors[f"{name}.weight_scale"])
    if scheme.symmetric:
        stored = torch.full((n_groups, out_f), offset - 1, dtype=torch.int64)  # v1: zero - 1, per element
    else:
        packed_zp = tensors[f"{name}.weight_zero_point"]  # [ceil(out*b/32), n_groups], zp + offset
        stored = unpack_codes(packed_zp.t().contiguous(), bits, out_f).to(torch.int64) + offset  # [groups, out]
    g_idx = tensors.get(f"{name}.weight_g_idx")
    if g_idx is None:
        g_idx = torch.arange(in_f, dtype=torch.int32) // scheme.effective_group_size(in_f)
    out = {
        f"{name}.qweight": tensors[f"{name}.weight_packed"].t().contiguous(),
        f"{name}.qzeros": pack_codes(stored - offset, bits),
        f"{name}.scales": scales.t().contiguous(),
        f"{name}.g_idx": g_idx.to(torch.int32).contiguous(),
    }
    return out, lossy


def layer_from_gptq(name: str, tensors: Mapping[str, Tensor], scheme: QuantScheme, fmt: str, desc_act: bool,
                    origin: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """One layer's GPTQ entries → compressed-tensors entries (validated; CompressError names tensor and file)."""
    where = f" in {origin.get(f'{name}.qweight', '?')}" if origin is not None else ""
    bits, offset, maxq = scheme.bits, 1 << (scheme.bits - 1), (1 << scheme.bits) - 1

    def get(suffix: str, dtype: torch.dtype | None) -> Tensor:
        t = tensors.get(f"{name}.{suffix}")
        if t is None:
            raise CompressError(f"tensor {name}.{suffix} is missing{where}")
        if dtype is not None and t.dtype != dtype:
            raise CompressError(f"tensor {name}.{suffix}{where} has dtype {t.dtype}, expected {dtype}")
        if t.ndim != (1 if suffix == "g_idx" else 2):
            raise CompressError(f"tensor {name}.{suffix}{where} has shape {list(t.shape)}")
        return t

    qweight = get("qweight", torch.int32)
    rows, out_f = qweight.shape
    g_idx = tensors.get(f"{name}.g_idx")
    in_f = int(g_idx.shape[0]) if g_idx is not None and g_idx.ndim == 1 else rows * 32 // bits
    if rows * 32 != in_f * bits:
        raise CompressError(f"tensor {name}.qweight{where} has {rows} rows, which cannot hold {in_f} "
                            f"{bits}-bit codes")
    check_expressible(name, scheme, out_f, in_f)
    n_groups = scheme.n_groups(in_f)
    scales = get("scales", None)
    if not scales.dtype.is_floating_point or tuple(scales.shape) != (n_groups, out_f):
        raise CompressError(f"tensor {name}.scales{where} is {scales.dtype} {list(scales.shape)}, expected a float "
                            f"[{n_groups}, {out_f}] for {scheme.tag}")
    qzeros = get("qzeros", torch.int32)
    if tuple(qzeros.shape) != (n_groups, out_f * bits // 32):
        raise CompressError(f"tensor {name}.qzeros{where} has shape {list(qzeros.shape)}, expected "
                            f"[{n_groups}, {out_f * bits // 32}]")
    zeros = unpack_codes(qzeros, bits, out_f).to(torch.int64) + offset  # stored unsigned, [groups, out]
    if fmt == "gptq":
        zeros = (zeros + 1) & maxq  # v1 per element: a stored maxq can only mean a zero of 0 written as -1
    result = {
        f"{name}.weight_packed": qweight.t().contiguous(),
        f"{name}.weight_scale": scales.t().contiguous(),
        f"{name}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if scheme.symmetric:
        if bool((zeros != offset).any()):
            raise CompressError(f"tensor {name}.qzeros{where} holds zero points other than {offset} although the "
                                "quantization config says sym")
    else:
        # compressed-tensors packs zero points along the output dim: [ceil(out*b/32), n_groups]
        result[f"{name}.weight_zero_point"] = pack_codes(zeros - offset, bits).t().contiguous()
    if g_idx is not None:
        if g_idx.dtype not in (torch.int32, torch.int64) or (in_f and (int(g_idx.min()) < 0
                                                                      or int(g_idx.max()) >= n_groups)):
            raise CompressError(f"tensor {name}.g_idx{where} must hold group ids 0..{n_groups - 1}")
        trivial = torch.arange(in_f) // scheme.effective_group_size(in_f)
        if desc_act or not torch.equal(g_idx.to(torch.int64), trivial):
            result[f"{name}.weight_g_idx"] = g_idx.to(torch.int32).contiguous()
    bias = tensors.get(f"{name}.bias")
    if bias is not None:
        result[f"{name}.bias"] = bias
    return result


def read_gptq_config(config: Mapping[str, Any]) -> tuple[QuantScheme, str, bool]:
    """(scheme, checkpoint_format, desc_act) of a GPTQ ``quantization_config``; CompressError for what we cannot read."""
    bits = config.get("bits")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise CompressError(f"quantization_config.bits {bits!r} is not one of "
                            f"{', '.join(map(str, SUPPORTED_BITS))}")
    group_size = config.get("group_size", -1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise CompressError(f"quantization_config.group_size {group_size!r} must be -1 or a positive integer")
    sym = config.get("sym", True)
    if not isinstance(sym, bool):
        raise CompressError(f"quantization_config.sym {sym!r} must be true or false")
    fmt = config.get("checkpoint_format", "gptq")
    if fmt not in CHECKPOINT_FORMATS:
        raise CompressError(f"GPTQ checkpoint_format {fmt!r} is not supported (expected gptq or gptq_v2)")
    pack_dtype = config.get("pack_dtype", "int32")
    if pack_dtype != "int32":
        raise CompressError(f"GPTQ pack_dtype {pack_dtype!r} is not supported (expected int32)")
    if config.get("dynamic"):
        raise CompressError("GPTQ per-module overrides (dynamic) are not supported")
    desc_act = bool(config.get("desc_act", False))
    return QuantScheme(bits=bits, group_size=group_size, symmetric=sym), fmt, desc_act


class GptqCodec(StorageCodec):
    name = "gptq"
    quant_method = "gptq"
    marker = "qweight"
    leaves = GPTQ_SUFFIXES
    code_leaves = ("qweight",)
    transformers_reads = False  # only through its GPTQ integration with gptqmodel installed
    readers = (
        "This folder uses the GPTQ layout (`quant_method: gptq`, see `quantize_config.json`), with",
        "contiguous groups (`desc_act: false`): GPTQModel reads it, and transformers reads it through its",
        "GPTQ integration with `gptqmodel` installed.",
    )
    scale_leaf = "scales"
    order_leaf = "g_idx"
    storage_cls = PackedWeight

    def scale_of(self, prefix: str, tensors: Mapping[str, Tensor]) -> Tensor:
        return tensors[f"{prefix}.scales"].t()  # stored [groups, out]

    def unsupported(self, scheme: QuantScheme | None) -> str | None:
        if scheme is not None and scheme.input_activations is not None:  # pack-quantized holds W4A8, GPTQ cannot
            return "it is weight-only (quantize_config.json has no field for input activations)"
        return "it needs a quantization scheme" if scheme is None else unpackable(scheme)

    def read_config(self, quant_config: Mapping[str, Any]) -> tuple[QuantScheme, dict[str, Any]]:
        scheme, fmt, desc_act = read_gptq_config(quant_config)
        return scheme, {"checkpoint_format": fmt, "desc_act": desc_act}

    def read(self, prefix: str, tensors: Mapping[str, Tensor], scheme: QuantScheme, *,
             checkpoint_format: str = "gptq_v2", desc_act: bool = False, **_: Any) -> PackedWeight:
        self.check(scheme, f"layer {prefix}: ")
        converted = layer_from_gptq(prefix, tensors, scheme, checkpoint_format, desc_act)
        return PackedWeight.from_tensors(prefix, converted, scheme)

    def encode_storage(self, weight: Tensor, scheme: QuantScheme, **qparams: Any) -> PackedWeight:
        return PACK_QUANTIZED.encode_storage(weight, scheme, **qparams)  # same codes, re-arranged on write

    def encode(self, weight: Tensor, scheme: QuantScheme | None, **qparams: Any) -> dict[str, Tensor]:
        assert scheme is not None
        packed = self.encode_storage(weight, scheme, **qparams)
        entries, _ = layer_to_gptq("p", packed.tensors("p"), scheme)
        return {k.split(".", 1)[1]: v for k, v in entries.items()}

    def wrap(self, storage: PackedWeight, bias: Tensor | None) -> QuantLinear:  # type: ignore[override]
        """In memory a GPTQ layer is the pack-quantized layer of the same codes."""
        return PACK_QUANTIZED.wrap(storage, bias)

    def config(self, scheme: QuantScheme | None, *, desc_act: bool = False, lm_head: bool = False,
               meta: Mapping[str, Any] | None = None, **_: Any) -> dict[str, Any]:
        """``quantize_config.json`` (also ``config.json["quantization_config"]``); ``meta`` as given (the
        exporter adds ``meta.quantizer``, naming only us)."""
        assert scheme is not None
        return {
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "desc_act": desc_act,
            "sym": scheme.symmetric,
            "lm_head": lm_head,
            "quant_method": "gptq",
            "checkpoint_format": checkpoint_format(scheme),
            "pack_dtype": "int32",
            "meta": dict(meta or {}),
        }

    def header_shape(self, prefix: str, meta: HeaderMeta, scheme: QuantScheme | None,
                     values: Mapping[str, list[int]]) -> tuple[int, int]:
        assert scheme is not None
        bits = scheme.bits
        rows, out_f = (list(meta[f"{prefix}.qweight"][1]) + [0, 0])[:2]
        g_idx = meta.get(f"{prefix}.g_idx")
        in_f = g_idx[1][0] if g_idx and len(g_idx[1]) == 1 else rows * 32 // bits
        n_groups = scheme.n_groups(in_f)
        expected = {"qweight": [in_f * bits // 32, out_f], "qzeros": [n_groups, out_f * bits // 32],
                    "scales": [n_groups, out_f]}
        if in_f * bits % 32:
            expected["qweight"] = [-1, out_f]  # no row count holds them: reported as a shape mismatch
        expect_headers(prefix, meta, expected, f"GPTQ {scheme.tag}")
        return out_f, in_f


GPTQ = register(GptqCodec())
