"""What a checkpoint holds, from ``config.json`` and the safetensors headers alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from compress.codecs import Codec, layer_plan
from compress.core.errors import CompressError
from compress.evaluate.size import (
    lowrank_header_meta,
    safetensors_header_meta,
    weights_bytes_by_component,
)
from compress.export.load import read_json, weight_files
from compress.kernels.kv_cache import SCALE_NAMES as KV_SCALE_NAMES
from compress.kernels.kv_cache import attention_modules, read_kv_cache_scheme
from compress.kernels.kv_cache import scale_shape as kv_scale_shape


def inspect_checkpoint(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise CompressError(f"checkpoint {folder} does not exist")
    if not folder.is_dir():
        raise CompressError(f"checkpoint {folder} is a file; expected a folder")
    config = read_json(folder / "config.json", "config")
    quant = config.get("quantization_config")
    weight_files(folder)  # validates a shard index before any header is read
    meta = safetensors_header_meta(folder)
    plan = layer_plan(meta, quant, source=str(folder))
    values = _shape_values(folder, plan)
    layers, sparse, codecs = [], [], {}
    for stored in plan:
        out_features, in_features = stored.codec.header_shape(stored.name, meta, stored.scheme, values)
        codecs[stored.name] = stored.codec
        if not stored.codec.quantized:
            sparse.append({"name": stored.name, "format": stored.codec.name, "out_features": out_features,
                           "in_features": in_features})
            continue
        scheme = stored.scheme
        assert scheme is not None
        order = stored.codec.order_leaf
        layers.append({
            "name": stored.name, "out_features": out_features, "in_features": in_features, "scheme": scheme.tag,
            "bits": scheme.bits, "group_size": _group_size(scheme), "symmetric": scheme.symmetric,
            "act_order": bool(stored.options.get("desc_act")) if "desc_act" in stored.options
            else order is not None and f"{stored.name}.{order}" in meta,
            "bits_per_weight": stored.codec.stored_bits(stored.name, meta) / max(out_features * in_features, 1),
        })
    kv_block = quant.get("kv_cache_scheme") if isinstance(quant, dict) else None
    kv_strategy = None if kv_block is None else read_kv_cache_scheme(kv_block)
    kv_layers = _check_architecture(folder, meta, codecs, kv_strategy)
    options = next((stored.options for stored in plan if stored.options), {})
    if "checkpoint_format" in options:  # a model-level layout (GPTQ) names its own variant
        fmt = str(options["checkpoint_format"])
    else:
        fmt = quant.get("format", "dense") if isinstance(quant, dict) else "dense"
    by_component = weights_bytes_by_component({**meta, **lowrank_header_meta(folder)}, codecs)
    report = _report(folder, config, fmt, layers, meta, set(codecs), by_component)
    if sparse:
        report["sparse"] = sparse
    if kv_strategy is not None:
        report["kv_cache"] = {"type": "fp8-e4m3", "strategy": kv_strategy, "layers": kv_layers}
    return report


def _group_size(scheme) -> int | None:
    """The scheme's group size (-1 per channel); None for per-tensor scales, which have none."""
    w = scheme.weights
    return None if w is None or w.strategy not in ("group", "channel") else scheme.group_size


def _report(folder: Path, config: dict, fmt: str, layers: list[dict[str, Any]],
            meta: dict[str, tuple[str, list[int]]], stored: set[str], by_component: dict[str, int]) -> dict[str, Any]:
    dense = sorted(n for n in meta if n.rsplit(".", 1)[0] not in stored)
    return {
        "path": str(folder),
        "architecture": ", ".join(config.get("architectures") or [config.get("model_type", "?")]),
        "format": fmt,
        "layers": layers,
        "dense": dense,
        "bytes_by_component": by_component,
        "total_bytes": sum(by_component.values()),
    }


def _shape_values(folder: Path, plan) -> dict[str, list[int]]:
    """The tiny shape tensors' values (a layout's ``shape_leaves``: the true [out, in] without padding)."""
    wanted = {f"{stored.name}.{leaf}" for stored in plan for leaf in stored.codec.shape_leaves}
    values: dict[str, list[int]] = {}
    if not wanted:
        return values
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    if key in wanted:
                        values[key] = [int(v) for v in handle.get_tensor(key).flatten().tolist()]
        except (SafetensorError, OSError, ValueError, RuntimeError):
            raise CompressError(f"weights file {file.name} is corrupt or truncated") from None
    return values


def _check_architecture(folder: Path, meta: dict[str, tuple[str, list[int]]], codecs: dict[str, Codec],
                        kv_strategy: str | None = None) -> int:
    """Every tensor the architecture needs is present with its shape (built on the meta device: no memory);
    with a ``kv_cache_scheme``, every attention's ``k_scale`` / ``v_scale`` too. Returns how many attention
    modules have KV-cache scales."""
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
        if prefix in codecs and leaf == "weight":
            continue
        if name not in meta:
            if name in tied or name.endswith(("rotary_emb.inv_freq", "masked_bias", ".attn.bias")):
                continue
            raise CompressError(f"checkpoint {folder} lacks tensor {name}")
        want = list(tensor.shape)
        if meta[name][1] not in (want, want[::-1] if prefix in conv1d else want):
            raise CompressError(f"tensor {name} has shape {meta[name][1]}, but the config implies {want}")
    known = set(model.state_dict())
    attentions = attention_modules(model) if kv_strategy is not None else {}
    for prefix, module in attentions.items():
        want = list(kv_scale_shape(module, kv_strategy))
        for leaf in KV_SCALE_NAMES:
            name = f"{prefix}.{leaf}"
            if name not in meta:
                raise CompressError(f"checkpoint {folder} has a kv_cache_scheme but lacks tensor {name}")
            if meta[name][1] != want:
                raise CompressError(f"tensor {name} has shape {meta[name][1]}, but kv_cache_scheme strategy "
                                    f"{kv_strategy} implies {want}")
            known.add(name)
    for name in meta:
        prefix, _, leaf = name.rpartition(".")
        if name not in known and not (prefix in codecs and leaf in codecs[prefix].leaves):
            raise CompressError(f"tensor {name} does not belong to this architecture")
    return len(attentions)
