"""What a checkpoint holds, from ``config.json`` and the safetensors headers alone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from compress.core.errors import CompressError
from compress.core.packing import packed_size
from compress.core.scheme import QuantScheme
from compress.evaluate.size import (
    DENSE,
    QPARAMS,
    QUANTIZED,
    safetensors_header_meta,
    weights_bytes_by_component,
)
from compress.export.gptq import GPTQ_SUFFIXES, read_gptq_config
from compress.export.load import read_json, scheme_for, weight_files

_CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")

_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}


def _bits(dtype: str) -> int:
    return _DTYPE_BITS.get(dtype.upper().replace("TORCH.", ""), 32)


def inspect_checkpoint(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise CompressError(f"checkpoint {folder} does not exist")
    if not folder.is_dir():
        raise CompressError(f"checkpoint {folder} is a file; expected a folder")
    config = read_json(folder / "config.json", "config")
    quant = config.get("quantization_config")
    weight_files(folder)  # validates a shard index before any header is read
    meta = safetensors_header_meta(folder)
    if quant is None and any(n.endswith((".weight_packed", ".qweight")) for n in meta):
        raise CompressError(f"{folder} holds packed weights but config.json has no quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "gptq":
        layers = _gptq_layers(meta, quant)
        _check_architecture(folder, meta, {layer["name"] for layer in layers}, GPTQ_SUFFIXES)
        return _report(folder, config, str(quant.get("checkpoint_format", "gptq")), layers, meta,
                       by_component=_gptq_bytes_by_component(meta, {layer["name"] for layer in layers}))
    shapes = _shape_values(folder)
    layers = []
    for name in sorted(n[: -len(".weight_packed")] for n in meta if n.endswith(".weight_packed")):
        if not isinstance(quant, dict):
            raise CompressError(f"{folder} holds packed weights but config.json has no quantization_config")
        scheme, _ = scheme_for(name, quant)
        true_shape = shapes.get(name)
        if true_shape is None or len(true_shape) != 2:
            raise CompressError(f"quantized layer {name} has no valid weight_shape tensor")
        out_features, in_features = true_shape
        _check_packed_shapes(name, scheme, out_features, in_features, meta)
        stored_bits = 0
        for suffix in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"):
            if f"{name}.{suffix}" in meta:
                dtype, shape = meta[f"{name}.{suffix}"]
                count = 1
                for dim in shape:
                    count *= dim
                stored_bits += count * _bits(dtype)
        layers.append({
            "name": name, "out_features": out_features, "in_features": in_features, "scheme": scheme.tag,
            "bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric,
            "act_order": f"{name}.weight_g_idx" in meta,
            "bits_per_weight": stored_bits / max(out_features * in_features, 1),
        })
    _check_architecture(folder, meta, {layer["name"] for layer in layers}, _CT_SUFFIXES)
    fmt = (quant or {}).get("format", "dense") if isinstance(quant, dict) else "dense"
    return _report(folder, config, fmt, layers, meta)


def _report(folder: Path, config: dict, fmt: str, layers: list[dict[str, Any]],
            meta: dict[str, tuple[str, list[int]]], by_component: dict[str, int] | None = None) -> dict[str, Any]:
    by_component = by_component or weights_bytes_by_component(meta)
    quantized_prefixes = {layer["name"] for layer in layers}
    dense = sorted(n for n in meta if n.rsplit(".", 1)[0] not in quantized_prefixes)
    return {
        "path": str(folder),
        "architecture": ", ".join(config.get("architectures") or [config.get("model_type", "?")]),
        "format": fmt,
        "layers": layers,
        "dense": dense,
        "bytes_by_component": by_component,
        "total_bytes": sum(by_component.values()),
    }


def _gptq_bytes_by_component(meta: dict[str, tuple[str, list[int]]], layers: set[str]) -> dict[str, int]:
    """Bytes by component for the GPTQ layout: a quantized layer's ``qweight`` holds its codes, its ``qzeros``,
    ``scales`` and ``g_idx`` are its quantization parameters (the compressed-tensors names would count 0 here)."""
    dense = {n: m for n, m in meta.items() if n.rpartition(".")[0] not in layers}
    out = weights_bytes_by_component(dense)
    for name, (dtype, shape) in meta.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix not in layers:
            continue
        size = math.ceil(math.prod(shape) * _bits(dtype) / 8)
        if leaf == "qweight":
            out[QUANTIZED] += size
        elif leaf in ("qzeros", "scales", "g_idx"):
            out[QPARAMS] += size
        else:  # a bias rides along, dense
            out[DENSE] += size
    return out


def _shape_values(folder: Path) -> dict[str, list[int]]:
    """The tiny ``weight_shape`` tensors' values: the true [out, in] without padding."""
    values: dict[str, list[int]] = {}
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    if key.endswith(".weight_shape"):
                        values[key[: -len(".weight_shape")]] = [int(v) for v in handle.get_tensor(key).tolist()]
        except (SafetensorError, OSError, ValueError, RuntimeError):
            raise CompressError(f"weights file {file.name} is corrupt or truncated") from None
    return values


def _check_packed_shapes(name: str, scheme: QuantScheme, out_f: int, in_f: int,
                         meta: dict[str, tuple[str, list[int]]]) -> None:
    """Header shapes of one compressed-tensors layer against its scheme and ``weight_shape``."""
    n_groups = scheme.n_groups(in_f)
    expected = {"weight_packed": [out_f, packed_size(in_f, scheme.bits)], "weight_scale": [out_f, n_groups]}
    if not scheme.symmetric:
        expected["weight_zero_point"] = [packed_size(out_f, scheme.bits), n_groups]
    if f"{name}.weight_g_idx" in meta:
        expected["weight_g_idx"] = [in_f]
    for suffix, shape in expected.items():
        if f"{name}.{suffix}" not in meta:
            raise CompressError(f"tensor {name}.{suffix} is missing")
        if meta[f"{name}.{suffix}"][1] != shape:
            raise CompressError(f"tensor {name}.{suffix} has shape {meta[f'{name}.{suffix}'][1]}, expected {shape} "
                                f"for scheme {scheme.tag}")


def _gptq_layers(meta: dict[str, tuple[str, list[int]]], quant: dict) -> list[dict[str, Any]]:
    """Layers of a GPTQ-layout checkpoint, their header shapes checked against the GPTQ config."""
    scheme, _, _ = read_gptq_config(quant)
    bits = scheme.bits
    layers = []
    for name in sorted(n[: -len(".qweight")] for n in meta if n.endswith(".qweight")):
        rows, out_f = (meta[f"{name}.qweight"][1] + [0, 0])[:2]
        g_idx = meta.get(f"{name}.g_idx")
        in_f = g_idx[1][0] if g_idx and len(g_idx[1]) == 1 else rows * 32 // bits
        n_groups = scheme.n_groups(in_f)
        expected = {"qweight": [in_f * bits // 32, out_f], "qzeros": [n_groups, out_f * bits // 32],
                    "scales": [n_groups, out_f]}
        stored_bits = 0
        for suffix, shape in expected.items():
            if f"{name}.{suffix}" not in meta:
                raise CompressError(f"tensor {name}.{suffix} is missing")
            if meta[f"{name}.{suffix}"][1] != shape or in_f * bits % 32:
                raise CompressError(f"tensor {name}.{suffix} has shape {meta[f'{name}.{suffix}'][1]}, expected "
                                    f"{shape} for GPTQ {scheme.tag}")
        for suffix in GPTQ_SUFFIXES:
            if f"{name}.{suffix}" in meta:
                dtype, shape = meta[f"{name}.{suffix}"]
                stored_bits += math.prod(shape) * _bits(dtype)
        layers.append({
            "name": name, "out_features": out_f, "in_features": in_f, "scheme": scheme.tag, "bits": bits,
            "group_size": scheme.group_size, "symmetric": scheme.symmetric, "act_order": bool(quant.get("desc_act")),
            "bits_per_weight": stored_bits / max(out_f * in_f, 1),
        })
    return layers


def _check_architecture(folder: Path, meta: dict[str, tuple[str, list[int]]], quantized: set[str],
                        suffixes: tuple[str, ...]) -> None:
    """Every tensor the architecture needs is present with its shape (built on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig

    from compress.models.blocks import convert_conv1d_to_linear
    from compress.models.load import instantiate_from_config

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = instantiate_from_config(config)
    except CompressError:
        raise
    except Exception as error:  # transformers raises many types for a config it cannot build
        raise CompressError(f"config.json in {folder} cannot be read by transformers ({error})") from None
    conv1d = set(convert_conv1d_to_linear(model))
    owners: dict[int, str] = {}
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in owners:
            tied.update((name, owners[id(param)]))
        owners.setdefault(id(param), name)
    for name, tensor in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in quantized and leaf == "weight":
            continue
        if name not in meta:
            if name in tied or name.endswith(("rotary_emb.inv_freq", "masked_bias", ".attn.bias")):
                continue
            raise CompressError(f"checkpoint {folder} lacks tensor {name}")
        want = list(tensor.shape)
        if meta[name][1] not in (want, want[::-1] if prefix in conv1d else want):
            raise CompressError(f"tensor {name} has shape {meta[name][1]}, but the config implies {want}")
    known = set(model.state_dict())
    for name in meta:
        prefix, _, leaf = name.rpartition(".")
        if name not in known and not (prefix in quantized and leaf in suffixes):
            raise CompressError(f"tensor {name} does not belong to this architecture")
