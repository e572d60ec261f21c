"""``compress convert``: re-arrange a quantized checkpoint between compressed-tensors and the GPTQ layout.

Both layouts hold the same integer codes, scales, zero points and g_idx, so conversion never dequantizes: it
re-packs tensors (``export/gptq.py``) and copies everything else. Only the scale dtype can change (GPTQ stores
fp16; a wider source is rounded with a warning). The caller provides the output folder; the CLI gives a
staging folder that is renamed into place only when the conversion has finished (DESIGN: artifacts).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from compress.codecs import Codec, layer_plan
from compress.codecs.gptq import GPTQ
from compress.codecs.pack_quantized import PACK_QUANTIZED
from compress.core.errors import CompressError
from compress.core.records import FACT_FIELDS, LayerRecord, LayerRecords
from compress.export.adapter import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS
from compress.export.checkpoint import INDEX_NAME, write_weights
from compress.export.gptq import (
    QUANTIZE_CONFIG_NAME,
    compressed_tensors_config,
    from_gptq,
    read_gptq_config,
    to_gptq,
    write_quantize_config,
)
from compress.export.load import _check_quant_config, read_json, read_tensors, weight_files
from compress.export.manifest import MANIFEST_NAME, write_manifest
from compress.export.st_files import copy_sentence_transformers_files

FORMATS = ("compressed-tensors", "gptq")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_NOT_COPIED = {"config.json", QUANTIZE_CONFIG_NAME, MANIFEST_NAME, INDEX_NAME, "report.json", "recipe.yaml"}


def checkpoint_format(quant_config: Any) -> str:
    """"compressed-tensors" or "gptq" for a ``quantization_config`` we can read; CompressError otherwise."""
    if isinstance(quant_config, dict) and quant_config.get("quant_method") == GPTQ.quant_method:
        read_gptq_config(quant_config)
        return "gptq"
    _check_quant_config(quant_config)
    return "compressed-tensors"


def _linear_names(config_data: dict, folder: Path) -> tuple[list[str], list[str]]:
    """(every Linear, the Linears inside decoder blocks) of the architecture, built on the meta device."""
    from transformers import AutoConfig

    from compress.models.blocks import convert_conv1d_to_linear, find_linears, select_layers
    from compress.models.load import instantiate_from_config

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as error:  # transformers raises many types for a bad config
        raise CompressError(f"config.json in {folder} cannot be read by transformers ({error})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = instantiate_from_config(config)
    convert_conv1d_to_linear(model)
    return list(find_linears(model)), select_layers(model, ignore=())


def convert_checkpoint(source: Path, out_dir: Path, to: str, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict[str, Any]:
    """Write ``source`` re-arranged as ``to`` into the (empty) ``out_dir``; returns a summary for the CLI."""
    if to not in FORMATS:
        raise CompressError(f"unknown target format {to!r}; use {' or '.join(FORMATS)}")
    if not source.is_dir():
        raise CompressError(f"checkpoint {source} does not exist or is not a folder")
    config_data = read_json(source / "config.json", "config")
    quant = config_data.get("quantization_config")
    if quant is None:
        raise CompressError(f"{source} is not a quantized checkpoint (config.json has no quantization_config)")
    origin_format = checkpoint_format(quant)
    if origin_format == to:
        raise CompressError(f"{source} is already in the {to} layout")
    tensors, origin = read_tensors(weight_files(source))
    all_linears, in_blocks = _linear_names(config_data, source)

    if to == "gptq":
        if isinstance(quant, dict) and quant.get("kv_cache_scheme") is not None:
            raise CompressError(f"{source} quantizes its KV cache (kv_cache_scheme), which the GPTQ layout has no "
                                "place for; keep it in the compressed-tensors layout")
        schemes = {}
        for layer in layer_plan(tensors, quant, source=str(source)):
            file = origin.get(f"{layer.name}.{layer.codec.marker}")
            if layer.codec is not PACK_QUANTIZED:  # GPTQ re-arranges packed integer codes, nothing else
                raise CompressError(f"layer {layer.name} is stored as {layer.codec.name}, which the GPTQ layout "
                                    "cannot hold; only pack-quantized layers convert")
            try:
                PACK_QUANTIZED.read(layer.name, tensors, layer.scheme)
            except CompressError as error:
                raise CompressError(f"{str(error).rstrip('.')} (in {file})") from None
            schemes[layer.name] = layer.scheme
        meta = _source_meta(source)
        converted, new_quant = to_gptq(tensors, schemes, dense_in_blocks=[n for n in in_blocks if n not in schemes],
                                       meta=meta)
        write_quantize_config(out_dir, new_quant)
    else:
        converted, schemes = from_gptq(tensors, quant, origin)
        has_g_idx = any(n.endswith(".weight_g_idx") for n in converted)
        new_quant = compressed_tensors_config(schemes, has_g_idx, ignore=all_linears)
    source_codec, target_codec = (PACK_QUANTIZED, GPTQ) if to == "gptq" else (GPTQ, PACK_QUANTIZED)
    changes = _changes(tensors, converted, schemes, source_codec, target_codec)
    write_weights(converted, out_dir, max_shard_bytes)
    config_data["quantization_config"] = new_quant
    (out_dir / "config.json").write_text(json.dumps(config_data, indent=2, sort_keys=True) + "\n")
    copied = _copy_side_files(source, out_dir)
    copied += [name for name in copy_sentence_transformers_files(source, out_dir) if name not in copied]
    recipe = _converted_recipe(source, out_dir, to)
    manifest = _read_manifest(source)
    if recipe:  # our own artifact: the card is rewritten for the new layout (a foreign README is copied as is)
        _rewrite_card(source, out_dir, manifest, recipe)
    layers = manifest.get("layers")  # codes, scales and how they were chosen are unchanged: so are the records
    write_manifest(out_dir, source_model=manifest.get("source_model") or str(source), recipe=recipe,
                   calibration=manifest.get("calibration"), evaluation=None,
                   layers=layers if isinstance(layers, list) else None)
    return {"source": str(source), "from": origin_format, "to": to, "layers": len(schemes),
            "scheme": next(iter(schemes.values())).tag if schemes else None, "copied": copied, **changes}


def _changes(source: dict[str, torch.Tensor], converted: dict[str, torch.Tensor], schemes: dict[str, Any],
             before_codec: Codec, after_codec: Codec) -> dict[str, Any]:
    """What the conversion kept and what it changed: ``unchanged`` (codes, zero points, group order) and
    ``scales`` (dtype before → after, and the largest relative change of a scale, 0.0 when bit-exact)."""
    names = sorted(schemes)
    asym = any(not scheme.symmetric for scheme in schemes.values())
    g_idx = any(f"{n}.{before_codec.order_leaf}" in source for n in names)
    unchanged = ["codes", *(["zero points"] if asym else []), *(["group order (g_idx)"] if g_idx else [])]
    dtypes_before, dtypes_after, worst = set(), set(), 0.0
    for name in names:  # both oriented [out, groups], whatever each layout stores
        before, after = before_codec.scale_of(name, source), after_codec.scale_of(name, converted)
        dtypes_before.add(str(before.dtype).removeprefix("torch."))
        dtypes_after.add(str(after.dtype).removeprefix("torch."))
        b, a = before.double(), after.double()
        nonzero = b != 0
        if bool(nonzero.any()):
            worst = max(worst, float(((a - b).abs()[nonzero] / b.abs()[nonzero]).max()))
    return {"unchanged": unchanged, "scales": {"from": "/".join(sorted(dtypes_before)) or None,
                                              "to": "/".join(sorted(dtypes_after)) or None,
                                              "max_relative_change": worst}}


def _rewrite_card(source: Path, out_dir: Path, manifest: dict[str, Any], recipe: dict[str, Any]) -> None:
    """The conversion is lossless, so the source's layers and eval figures still describe this folder."""
    from compress.export.card import write_card
    from compress.export.manifest import tool_version

    try:
        report = json.loads((source / "report.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        report = {}
    layers = report.get("layers") if isinstance(report, dict) and isinstance(report.get("layers"), list) else []
    write_card(out_dir, source_model=str(manifest.get("source_model") or source), recipe=recipe,
               calibration=manifest.get("calibration") if isinstance(manifest.get("calibration"), dict) else None,
               evaluation=manifest.get("eval") if isinstance(manifest.get("eval"), dict) else None,
               records=_source_records(layers, manifest.get("layers")), tool_version=tool_version())


def _source_records(report_layers: list[Any], manifest_layers: Any) -> LayerRecords:
    """The source artifact's layer records, for its card: each stage's entry in ``report.json`` (method, tag,
    shape, error), merged per layer, with the observer, act-order and sparsity its manifest lists."""
    stages = []
    for entry in report_layers:
        try:
            stages.append(LayerRecord(name=str(entry["name"]), methods=(str(entry["method"]),),
                                      tags=(str(entry["scheme"]),), in_features=int(entry["in_features"]),
                                      out_features=int(entry["out_features"]),
                                      rel_weight_error=entry.get("rel_weight_error")))
        except (KeyError, TypeError, ValueError, AttributeError, CompressError):
            continue  # an entry this version cannot read says nothing the card needs
    facts: dict[str, dict[str, Any]] = {}
    for entry in manifest_layers if isinstance(manifest_layers, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            facts[entry["name"]] = {k: entry.get(k) for k in FACT_FIELDS if isinstance(entry.get(k), str)}
    records = []
    for name, record in LayerRecords(stages).items():
        try:
            records.append(replace(record, **facts.get(name, {})))
        except CompressError:  # an actorder this version does not know
            records.append(record)
    return LayerRecords(records)


def _copy_side_files(source: Path, out_dir: Path) -> list[str]:
    """Tokenizer, generation config, chat template, ...: every top-level file that is not weights or ours."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix != ".safetensors" and path.name not in _NOT_COPIED:
            shutil.copyfile(path, out_dir / path.name)  # new files, modes as the umask says (not the source's)
            copied.append(path.name)
    adapter = source / ADAPTER_DIR  # low-rank compensation: its factors name layers, not a layout, so it applies as is
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if (adapter / ADAPTER_CONFIG).is_file() else ():
        (out_dir / ADAPTER_DIR).mkdir(exist_ok=True)
        shutil.copyfile(adapter / name, out_dir / ADAPTER_DIR / name)
        copied.append(f"{ADAPTER_DIR}/{name}")
    return copied


def _read_manifest(source: Path) -> dict[str, Any]:
    path = source / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _source_meta(source: Path) -> dict[str, Any]:
    """GPTQ ``meta`` fields the source recipe knows (damping, static groups), so the conversion keeps them."""
    recipe = _read_recipe(source)
    stage = (recipe.get("stages") or [{}])[0] if isinstance(recipe.get("stages"), list) else {}
    meta: dict[str, Any] = {}
    if isinstance(stage, dict) and stage.get("method") == "gptq":
        meta["true_sequential"] = True
        for key, name in (("damp", "damp_percent"), ("static_groups", "static_groups")):
            if key in stage:
                meta[name] = stage[key]
    return meta


def _read_recipe(source: Path) -> dict[str, Any]:
    path = source / "recipe.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _converted_recipe(source: Path, out_dir: Path, to: str) -> dict[str, Any]:
    """The source recipe with ``export.format`` set to the new layout: re-running it reproduces this artifact."""
    recipe = _read_recipe(source)
    if not recipe:
        return {}
    export = recipe.get("export") if isinstance(recipe.get("export"), dict) else {}
    recipe["export"] = {**export, "format": to}
    (out_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return recipe
