"""The artifact of a run: export of the compressed model into the staging folder, then eval of what was
written, gates, report.json, the model card and (last, so it hashes them) manifest.json.

Split from ``run`` so the run reads as load → ``compress_model`` → ``write_export`` → ``finish_artifact``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from compress.core.errors import CompressError
from compress.core.records import LayerRecord, LayerRecords
from compress.evaluate.gates import check_gates
from compress.evaluate.size import dir_size_bytes
from compress.export.adapter import write_adapter
from compress.export.card import write_card
from compress.export.checkpoint import (
    BITMASK_PREFIX,
    checkpoint_tensors,
    quantization_config,
    quantized_modules,
    sparse_modules,
    write_config,
    write_weights,
)
from compress.export.gptq import (
    check_expressible,
    check_no_dense_in_blocks,
    single_scheme,
    to_gptq,
    write_quantize_config,
)
from compress.export.manifest import tool_version, write_manifest
from compress.export.st_files import copy_sentence_transformers_files
from compress.models.blocks import find_linears
from compress.models.load import LoadedModel
from compress.pipeline.evaluation import evaluate_artifact
from compress.recipes.loader import dump_recipe
from compress.recipes.schema import Recipe, parse_size

Progress = Callable[[str, int, int], None]


def linear_names(model: torch.nn.Module) -> list[str]:
    """Every linear layer of the compressed model, quantized or dense (what ``quantization_config`` ignores
    or targets): the model's shapes are final here, structured stages included."""
    return sorted({*find_linears(model), *quantized_modules(model)})


def finish_artifact(staging: Path, recipe: Recipe, source: str, *, calibration: dict[str, Any], parameters: int,
                    results: list[LayerRecord], timings: dict[str, float], progress: Progress | None = None,
                    extra_metrics: dict[str, Any] | None = None, extra_report: dict[str, Any] | None = None,
                    ) -> tuple[dict[str, Any], list, int, int, float]:
    """Eval of the exported folder, gates, then report.json, the model card and (last, so it hashes them)
    manifest.json: the tail every kind of run shares. ``results``: the sweep's per-stage records (``Records``):
    report.json lists them, the card and the manifest read them merged per layer. Returns (metrics, gates,
    size before, after, ratio)."""
    tick = time.perf_counter()
    metrics: dict[str, Any] = {}
    if recipe.eval.enabled:
        metrics = evaluate_artifact(staging, baseline=source, config=recipe.eval, recipe=recipe, progress=progress)
    timings["eval_s"] = time.perf_counter() - tick
    metrics.update(extra_metrics or {})
    size_before, size_after = _source_size(source), dir_size_bytes(staging)
    ratio = size_before / size_after if size_after else 0.0
    metrics["compression_ratio"] = ratio
    gates = check_gates(metrics, max_ppl_increase=recipe.eval.max_ppl_increase,
                        min_compression_ratio=recipe.eval.min_compression_ratio, min_cosine=recipe.eval.min_cosine)
    report = {
        "source_model": display_source(source),
        "parameters": parameters,
        "size_before_bytes": size_before,
        "size_after_bytes": size_after,
        "layers": [r.report_entry() for r in results],
        "eval": metrics,
        "gates": [asdict(g) for g in gates],
        **(extra_report or {}),
    }
    (staging / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    as_recorded = recorded(recipe).model_dump(mode="json")
    layers = LayerRecords(results)
    write_card(staging, source_model=display_source(source), recipe=as_recorded, calibration=calibration,
               evaluation=metrics or None, records=layers, tool_version=tool_version())
    write_manifest(staging, source_model=display_source(source), recipe=as_recorded, calibration=calibration,
                   evaluation=metrics or None, layers=[record.summary() for record in layers.values()])
    return metrics, gates, size_before, size_after, ratio


def display_source(source: str) -> str:
    from compress.models.load import DEMO_MODEL_DIR

    return "demo (embedded)" if Path(source).resolve() == Path(DEMO_MODEL_DIR).resolve() else source


def write_export(model, loaded: LoadedModel, staging: Path, recipe: Recipe, all_linears, in_blocks: list[str], *,
                 source: str | None = None, records: Mapping[str, LayerRecord] | None = None) -> None:
    """Weights, config, generation config, tokenizer, the recorded recipe and, for a sentence-transformers
    source, its pipeline files (modules.json, 1_Pooling/, ...) so ``SentenceTransformer(out)`` opens it.
    ``records``: the layers' records (``Records.layers``), which name observers, act-order and sparsity."""
    sparse_format = recipe.export.sparse_format
    tensors = checkpoint_tensors(model, sparse_format, records)
    quant_config = quantization_config(model, all_linears, sparse_format, records)
    if recipe.export.format == "gptq":
        tensors, quant_config = _gptq_layout(model, tensors, recipe, in_blocks)
        write_quantize_config(staging, quant_config)
    write_weights(tensors, staging, parse_size(recipe.export.max_shard_size),
                  stem=BITMASK_PREFIX if sparse_format == "bitmask" and sparse_modules(model, records) else "model")
    write_adapter(model, staging)  # low-rank compensation factors, if any: lowrank/ (a PEFT adapter)
    write_config(model.config, staging, quant_config)
    generation = getattr(model, "generation_config", None)
    if generation is not None and loaded.kind == "causal-lm":
        generation.save_pretrained(str(staging))
    loaded.tokenizer.save_pretrained(str(staging))
    if source is not None:
        copy_sentence_transformers_files(source, staging)
    (staging / "recipe.yaml").write_text(dump_recipe(recorded(recipe)))


def _gptq_layout(model, tensors: dict[str, torch.Tensor], recipe: Recipe,
                 in_blocks: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The same codes re-arranged as GPTQ tensors; refuses what that layout cannot express (FORMATS.md)."""
    schemes = {name: module.scheme for name, module in quantized_modules(model).items()}
    stage = recipe.stages[0].model_dump()
    stage = stage.get("quantizer", stage) if stage.get("method") == "lowrank" else stage  # the wrapped quantizer's
    meta = {k: stage[k] for k in ("damp", "static_groups") if k in stage}
    meta = {("damp_percent" if k == "damp" else k): v for k, v in meta.items()}
    if stage.get("method") == "gptq":
        meta["true_sequential"] = True
    return to_gptq(tensors, schemes, dense_in_blocks=[n for n in in_blocks if n not in schemes], meta=meta)


def check_export(recipe: Recipe, model: torch.nn.Module, plan, in_blocks: list[str]) -> None:
    """Refuse an export the target layout cannot express before any compute is spent on it."""
    if recipe.export.format != "gptq":
        return
    from compress.models.blocks import find_linears

    linears = find_linears(model)
    schemes = {}
    for layer_pass, names in plan:
        if layer_pass.scope == "cache":
            raise CompressError("the GPTQ layout has no place for KV-cache scales; use --format compressed-tensors "
                                "(its kv_cache_scheme) with --kv-cache")
        scheme_for = getattr(layer_pass.config, "scheme_for", None)
        if scheme_for is None:
            raise CompressError(f"method {layer_pass.config.method} does not quantize, so it has no GPTQ layout")
        for name in names:
            lin = linears[name]
            schemes[name] = scheme_for(lin.in_features)
            check_expressible(name, schemes[name], lin.out_features, lin.in_features)
    single_scheme(schemes)
    check_no_dense_in_blocks(n for n in in_blocks if n not in schemes)


def recorded(recipe: Recipe) -> Recipe:
    """The recipe as stored in the artifact: how it was made, not where it was written (so the same job
    gives the same bytes wherever its output goes)."""
    return recipe.model_copy(update={"output": None})


def _source_size(source: str) -> int:
    path = Path(source)
    if path.is_dir():
        return dir_size_bytes(path)
    return 0
