"""Write a model whose targeted layers are ``QuantLinear`` as a compressed-tensors checkpoint.

The model's state dict already holds the checkpoint's tensor names (``QuantLinear`` buffers are named like
its codec's layout, ``compress.codecs``), so writing is: collect tensors, shard them, let each layer's codec
describe its scheme in ``config.json``. What the tensors do not say (which observer chose the scales, the
activation order, the sparsity pattern) comes from the layers' records (``compress.core.records``: the
sweep's ``records.layers``, or ``export.load.checkpoint_records`` for a loaded checkpoint); a layer without
a record was quantized with min/max scales, in order, unpruned. Tensors are written in sorted name order
with fixed metadata so that the same model gives the same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from compress.codecs import CODECS
from compress.codecs.sparse_bitmask import SPARSE_BITMASK
from compress.core.errors import CompressError
from compress.core.records import LayerRecord
from compress.core.scheme import QuantScheme
from compress.export.adapter import is_lowrank_key, lowrank_modules
from compress.kernels.kv_cache import kv_cache_scheme, kv_cache_strategy, kv_cache_tensors
from compress.kernels.llm_int8 import CONFIG_KEY as LLM_INT8_KEY
from compress.kernels.quant_linear import QuantLinear

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
BITMASK_PREFIX = SPARSE_BITMASK.name
"""File-name stem of the opt-in compact sparse layout (``export.sparse_format: bitmask``). Its weights are
deliberately not named ``model*.safetensors``: current readers (transformers + compressed-tensors >= 0.15,
vLLM) cannot decode bitmasks and would build the model with the pruned layers randomly initialised; with
no ``model.safetensors`` to find they refuse the folder instead. ``compress.load`` reads it."""
SPARSE_FORMATS = ("dense", "bitmask")
MIXED_FORMAT = "mixed-precision"
"""compressed-tensors' top-level ``format`` when config groups use different layouts (each group says its own)."""


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}


Records = Mapping[str, LayerRecord]
"""Layer name → its record (``LayerRecords``)."""


def sparse_modules(model: nn.Module, records: Records | None = None) -> dict[str, str]:
    """Pruned layers of ``model`` (dense or quantized) → their sparsity structure (``unstructured``, ``2:4``,
    ...), as their records say, in module order."""
    sparse: dict[str, str] = {}
    for name, _ in model.named_modules() if records else ():
        record = records.get(name)  # type: ignore[union-attr]
        if record is not None and record.sparsity is not None:
            sparse[name] = record.sparsity
    return sparse


def checkpoint_tensors(model: nn.Module, sparse_format: str = "dense",
                       records: Records | None = None) -> dict[str, torch.Tensor]:
    """Every persistent tensor once: tied parameters keep their first name, and Conv1D-born dense layers go
    back to the Conv1D layout the architecture's own loader expects.

    Pruned dense layers are written as ordinary dense weights (their zeros included), which every reader
    loads; ``sparse_format="bitmask"`` stores them in compressed-tensors' ``sparse-bitmask`` layout instead
    (kept values + a bit per weight), smaller on disk but readable only by ``compress.load`` today. Pruned
    layers that were also quantized keep their packed codes (zeros are codes like any other). Low-rank
    compensation factors are left out: ``export.adapter.write_adapter`` writes them beside the shards."""
    if sparse_format not in SPARSE_FORMATS:
        raise ValueError(f"unknown sparse format {sparse_format!r}")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    from_conv1d = {
        name for name, module in model.named_modules() if getattr(module, "_compress_from_conv1d", False)
    }
    compensated = set(lowrank_modules(model))  # their factors go to the PEFT adapter (export.adapter)
    sparse_dense = set() if sparse_format == "dense" else {
        name for name in sparse_modules(model, records) if not isinstance(model.get_submodule(name), QuantLinear)}
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        module_name, _, leaf = name.rpartition(".")
        if module_name in compensated and is_lowrank_key(name):
            continue
        if leaf == "weight" and module_name in from_conv1d:
            tensor = tensor.t()
        if leaf == "weight" and module_name in sparse_dense:
            for suffix, part in SPARSE_BITMASK.encode(tensor).items():
                tensors[f"{module_name}.{suffix}"] = part
            continue
        tensors[name] = tensor.detach().to("cpu").contiguous()
    tensors.update(kv_cache_tensors(model))  # non-persistent buffers: not in the state dict
    return tensors


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` can only swap)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file``, then the mode any other tool would give a new file (0666 less the umask: 0644 under
    umask 022) instead of the 0600 that safetensors creates its files with."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def write_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int,
                  stem: str = "model") -> list[Path]:
    """Safetensors shards plus an index when there is more than one, as transformers writes them
    (``stem`` other than ``model`` names the files so that readers looking for ``model*.safetensors``
    find none: see ``BITMASK_PREFIX``)."""
    shards = _shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        path = out_dir / f"{stem}.safetensors"
        _save({n: tensors[n] for n in shards[0]}, path, metadata)
        return [path]
    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    for index, names in enumerate(shards, start=1):
        file_name = f"{stem}-{index:05d}-of-{len(shards):05d}.safetensors"
        _save({n: tensors[n] for n in names}, out_dir / file_name, metadata)
        paths.append(out_dir / file_name)
        for n in names:
            weight_map[n] = file_name
            total += tensors[n].numel() * tensors[n].element_size()
    index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
    paths.append(out_dir / f"{stem}.safetensors.index.json")
    return paths


def quantization_config(model: nn.Module, all_linear_names: Iterable[str], sparse_format: str = "dense",
                        records: Records | None = None) -> dict | None:
    """The ``quantization_config`` block of FORMATS.md: one config group per distinct scheme, each naming
    the observer and activation order its first layer's record gives.

    A single scheme targets ``Linear`` and lists every other linear layer under ``ignore`` (what
    llm-compressor writes); several schemes target their layers by exact ``re:`` names.

    Pruning leaves no trace here unless the compact bitmask layout was asked for: vLLM refuses any
    model whose ``sparsity_config`` has targets ("sparsity support has been removed"), and a pruned
    model written densely needs none, so a pruned-only export is a plain dense checkpoint (``None``)
    and a pruned + quantized one an ordinary ``pack-quantized`` one. The pattern is in the report and
    the model card.
    """
    quantized = quantized_modules(model)
    records = records or {}
    sparsity = sparsity_config(model, records) if sparse_format == "bitmask" else {}
    kv_strategy = kv_cache_strategy(model)
    kv_scheme = None if kv_strategy is None else kv_cache_scheme(kv_strategy)
    if not quantized:
        if not sparsity and kv_scheme is None:
            return None
        return {"quant_method": "compressed-tensors", "format": "dense", "quantization_status": "compressed",
                "config_groups": {}, "ignore": sorted(all_linear_names), "kv_cache_scheme": kv_scheme,
                "sparsity_config": sparsity, "global_compression_ratio": None}
    by_scheme: dict[tuple[str, QuantScheme], list[str]] = {}
    for name, module in quantized.items():
        by_scheme.setdefault((module.format, module.scheme), []).append(name)
    formats = sorted({fmt for fmt, _ in by_scheme})
    mixed = len(formats) > 1
    ignore = sorted(set(all_linear_names) - set(quantized))
    groups = {}
    for index, ((fmt, scheme), names) in enumerate(sorted(by_scheme.items(), key=lambda kv: kv[1][0])):
        first = records.get(names[0])  # how the scales were chosen is read per group, from its first layer
        targets = ["Linear"] if len(by_scheme) == 1 else [f"re:^{_escape(n)}$" for n in names]
        body = CODECS.get(fmt).config(scheme, actorder=None if first is None else first.actorder,
                                      observer=(first and first.observer) or "minmax",
                                      has_g_idx=any(getattr(quantized[n], "weight_g_idx", None) is not None for n in names))
        groups[f"group_{index}"] = {"targets": targets, **body, **({"format": fmt} if mixed else {})}
    runtime = llm_int8_config(quantized)
    return {
        **({LLM_INT8_KEY: runtime} if runtime else {}),
        "quant_method": "compressed-tensors",
        "format": MIXED_FORMAT if mixed else formats[0],
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": kv_scheme,
        "sparsity_config": sparsity,
        "global_compression_ratio": None,
    }


def llm_int8_config(quantized: Mapping[str, QuantLinear]) -> dict | None:
    """``{"threshold": T, "targets": [names]}`` for the layers that run LLM.int8()'s outlier decomposition
    (``kernels/llm_int8.py``; compressed-tensors ignores the key), None when none does."""
    thresholds = {name: m.outlier_threshold for name, m in quantized.items() if m.outlier_threshold is not None}
    if not thresholds:
        return None
    if len(set(thresholds.values())) > 1:
        raise CompressError("these layers use different LLM.int8() thresholds, which one checkpoint key cannot "
                            "express; use one threshold")
    return {"threshold": next(iter(thresholds.values())), "targets": sorted(thresholds)}


def sparsity_config(model: nn.Module, records: Records | None = None) -> dict:
    """compressed-tensors' ``sparsity_config``: ``sparse-bitmask`` when dense pruned layers are stored as
    bitmasks, ``dense`` when every pruned layer is quantized (its codes are packed densely; the block then
    only records the pattern, which serving engines read to pick sparse kernels). ``{}`` when nothing is
    pruned. ``global_sparsity`` is the fraction of zeros over the pruned layers."""
    sparse = sparse_modules(model, records)
    if not sparse:
        return {}
    zeros = total = 0
    for name in sparse:
        module = model.get_submodule(name)
        weight = module.dequantized_weight(torch.float32) if isinstance(module, QuantLinear) else module.weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    structures = sorted(set(sparse.values()))
    any_dense = any(not isinstance(model.get_submodule(n), QuantLinear) for n in sparse)
    config = SPARSE_BITMASK.config(None, targets=[f"re:^{_escape(n)}$" for n in sorted(sparse)],
                                   global_sparsity=round(zeros / max(total, 1), 6),
                                   structure=structures[0] if len(structures) == 1 else "unstructured")
    if not any_dense:  # every pruned layer is quantized: its codes are packed densely, the block records the pattern
        config["format"] = "dense"
    return config


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


def write_config(config, out_dir: Path, quant_config: dict | None) -> Path:
    """config.json as the model's own config plus ``quantization_config``; keys sorted for stable bytes."""
    data = json.loads(config.to_json_string(use_diff=False))
    data.pop("quantization_config", None)
    data.pop("_name_or_path", None)
    if quant_config is not None:
        data["quantization_config"] = quant_config
    path = out_dir / "config.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
