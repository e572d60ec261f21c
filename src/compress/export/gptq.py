"""The GPTQ checkpoint layout (``quant_method: gptq``): the same integer codes as compressed-tensors, re-arranged.

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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from compress.core.errors import CompressError
from compress.core.packing import pack_codes, unpack_codes
from compress.core.scheme import SUPPORTED_BITS, QuantScheme

logger = logging.getLogger("compress")

QUANTIZE_CONFIG_NAME = "quantize_config.json"
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


def single_scheme(schemes: Mapping[str, QuantScheme]) -> QuantScheme:
    """The one scheme of the model; GPTQ's config has room for exactly one."""
    distinct = sorted({s.tag for s in schemes.values()})
    if not schemes:
        raise CompressError("the model has no quantized layers to write in the GPTQ layout")
    if len(distinct) > 1:
        raise CompressError(f"the GPTQ layout holds one scheme per model but this one mixes {', '.join(distinct)}; "
                            "export it as compressed-tensors")
    return next(iter(schemes.values()))


def check_no_dense_in_blocks(dense_in_blocks: Iterable[str]) -> None:
    """GPTQ readers quantize every Linear inside the decoder blocks; a dense one there cannot be described."""
    dense = sorted(dense_in_blocks)
    if dense:
        raise CompressError(f"layer {dense[0]} inside a decoder block is left dense, which the GPTQ layout cannot "
                            "express; quantize it or export as compressed-tensors")


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
    where = f" in {(origin or {}).get(f'{name}.qweight', '?')}"
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


def gptq_config(scheme: QuantScheme, *, desc_act: bool, lm_head: bool = False,
                meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``quantize_config.json`` (also ``config.json["quantization_config"]``). ``meta.quantizer`` names us only."""
    from compress.export.manifest import tool_version

    return {
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "desc_act": desc_act,
        "sym": scheme.symmetric,
        "lm_head": lm_head,
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format(scheme),
        "pack_dtype": "int32",
        "meta": {**(meta or {}), "quantizer": f"compress-toolkit {tool_version()}"},
    }


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


def gptq_layer_names(tensors: Iterable[str]) -> list[str]:
    return sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight"))


def to_gptq(tensors: Mapping[str, Tensor], schemes: Mapping[str, QuantScheme], *,
            dense_in_blocks: Iterable[str] = (), meta: Mapping[str, Any] | None = None
            ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A compressed-tensors state dict → (GPTQ state dict, GPTQ quantization_config). Dense tensors pass through."""
    scheme = single_scheme(schemes)
    check_no_dense_in_blocks(dense_in_blocks)
    quantized = set(schemes)
    out = {n: t for n, t in tensors.items() if n.rpartition(".")[0] not in quantized or n.endswith(".bias")}
    lossy_layers = []
    for name in sorted(quantized):
        layer, lossy = layer_to_gptq(name, tensors, scheme)
        out.update(layer)
        if lossy:
            lossy_layers.append(name)
    if lossy_layers:
        dtype = tensors[f"{lossy_layers[0]}.weight_scale"].dtype
        logger.warning(f"the GPTQ layout stores scales as float16: {len(lossy_layers)} layers' {dtype} scales "
                       "were rounded (dequantized weights differ by at most that rounding)")
    desc_act = any(f"{n}.weight_g_idx" in tensors for n in quantized)
    config = gptq_config(scheme, desc_act=desc_act, lm_head=any(n.split(".")[-1] == "lm_head" for n in quantized),
                         meta=meta)
    return out, config


def from_gptq(tensors: Mapping[str, Tensor], config: Mapping[str, Any], origin: dict[str, str] | None = None
              ) -> tuple[dict[str, Tensor], dict[str, QuantScheme]]:
    """A GPTQ state dict → (compressed-tensors state dict, scheme per quantized layer). ``origin`` is updated."""
    scheme, fmt, desc_act = read_gptq_config(config)
    names = gptq_layer_names(tensors)
    layer_set = set(names)
    out = {n: t for n, t in tensors.items()
           if not (n.rpartition(".")[0] in layer_set and n.rpartition(".")[2] in GPTQ_SUFFIXES)}
    for name in names:
        converted = layer_from_gptq(name, tensors, scheme, fmt, desc_act, origin)
        out.update(converted)
        if origin is not None:
            for key in converted:
                origin.setdefault(key, origin.get(f"{name}.qweight", "?"))
    return out, {n: scheme for n in names}


def compressed_tensors_config(schemes: Mapping[str, QuantScheme], has_g_idx: bool, ignore: Iterable[str]
                              ) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config`` of a model with one scheme (what GPTQ can carry)."""
    scheme = single_scheme(schemes)
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": scheme.to_compressed_tensors(actorder="group" if has_g_idx else None),
            "input_activations": None,
            "output_activations": None,
        }},
        "ignore": sorted(set(ignore) - set(schemes)),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


def write_quantize_config(out_dir: Path, config: Mapping[str, Any]) -> Path:
    path = out_dir / QUANTIZE_CONFIG_NAME
    path.write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return path

