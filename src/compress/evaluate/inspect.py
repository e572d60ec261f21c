"""What a checkpoint holds, from ``config.json`` and the safetensors headers alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from compress.core.errors import CompressError
from compress.evaluate.size import safetensors_header_meta, weights_bytes_by_component
from compress.export.load import read_json, scheme_for, weight_files

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
    meta = safetensors_header_meta(folder)
    by_component = weights_bytes_by_component(meta)
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
    quantized_prefixes = {layer["name"] for layer in layers}
    dense = sorted(n for n in meta if n.rsplit(".", 1)[0] not in quantized_prefixes)
    return {
        "path": str(folder),
        "architecture": ", ".join(config.get("architectures") or [config.get("model_type", "?")]),
        "format": (quant or {}).get("format", "dense") if isinstance(quant, dict) else "dense",
        "layers": layers,
        "dense": dense,
        "bytes_by_component": by_component,
        "total_bytes": sum(by_component.values()),
    }


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
