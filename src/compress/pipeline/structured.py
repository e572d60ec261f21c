"""The run path of recipes that start with structured stages: load → calibrate → prune (whole model) →
optional layer-wise stages on the smaller model → export → eval → manifest, in the same staging folder.

A structured stage changes the model's shape, so it cannot run inside the block sweep; it runs first, on
the whole model, and the result is exported as a plain dense transformers checkpoint with a smaller config
(or, when quantize stages follow, a compressed-tensors one of the smaller model). Everything the quantize
path writes is written here too, by the same helpers of ``compress.pipeline.run``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from compress.core.errors import CompressError, GateFailed
from compress.evaluate.size import parameter_count
from compress.models.blocks import find_blocks, find_linears, plan_layers, select_layers
from compress.models.load import load_config, load_model, resolve_model_source
from compress.passes import PASSES
from compress.passes.base import ModelPass
from compress.pipeline.output_dir import output_path, staging_dir
from compress.pipeline.run import (
    Log,
    Progress,
    RunResult,
    _calibrate,
    _display_source,
    _export,
    build_passes,
    default_output,
    finish_artifact,
    per_channel_fallback,
    refuse_compressed,
    resolve_device,
)
from compress.pipeline.sequential import check_layers, run_layerwise
from compress.pipeline.structured_sweep import check_feasible, prune_structured
from compress.recipes.schema import Recipe


def is_structured(recipe: Recipe) -> bool:
    """Whether any stage is a whole-model pass (then ``run`` takes this path)."""
    return any(issubclass(PASSES.get(stage.method), ModelPass) for stage in recipe.stages)


def split_stages(recipe: Recipe) -> tuple[list[Any], list[Any]]:
    """(structured passes, layer-wise passes), refusing orders this path cannot run."""
    passes = build_passes(recipe)
    whole = [p for p in passes if isinstance(p, ModelPass)]
    first_layerwise = next((i for i, p in enumerate(passes) if not isinstance(p, ModelPass)), len(passes))
    if any(isinstance(p, ModelPass) for p in passes[first_layerwise:]):
        raise CompressError("structured stages must come before layer-wise stages (prune the shape first, "
                            "then quantize or sparsify the smaller model)")
    if recipe.export.format == "gptq":
        raise CompressError("structured pruning exports a plain or compressed-tensors checkpoint; "
                            "the GPTQ layout is not supported with it")
    return whole, passes[first_layerwise:]


def check_structured(recipe: Recipe, source: str) -> tuple[list[Any], list[Any]]:
    """Every refusal that the config alone can decide, before any folder is created or weight read."""
    whole, layerwise, _ = _check(recipe, source)
    return whole, layerwise


def plan_structured(recipe: Recipe, source: str) -> list[dict[str, Any]]:
    """What each structured stage will remove, from the config alone (``--dry-run``), after the same checks
    a run makes: ``{target, asked, removed, of, summary}`` per stage (``check_feasible``)."""
    return _check(recipe, source)[2]


def _check(recipe: Recipe, source: str) -> tuple[list[Any], list[Any], list[dict[str, Any]]]:
    whole, layerwise = split_stages(recipe)
    config = load_config(source, trust_remote_code=recipe.trust_remote_code)
    every = {name for name, _, _ in plan_layers(config, ignore=(), trust_remote_code=recipe.trust_remote_code)}
    planned = []
    for layer_pass in whole:
        planned.append(check_feasible(config, layer_pass))
        kept = {name for name, _, _ in plan_layers(config, ignore=layer_pass.config.ignore,
                                                   trust_remote_code=recipe.trust_remote_code)}
        if kept != every:
            raise CompressError("structured pruning changes every block alike (the config stays uniform), "
                                "so its ignore patterns cannot exempt layers inside the blocks")
    return whole, layerwise, planned


def run_structured(recipe: Recipe, out_dir: str | Path | None = None, *, overwrite: bool = False,
                   progress: Progress | None = None, log: Log | None = None) -> RunResult:
    """``compress.run`` for recipes with structured stages; same artifact layout and result."""
    say = log or (lambda message: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    target = output_path(out_dir) if out_dir is not None else default_output(recipe)
    device = resolve_device(recipe.device)
    source = resolve_model_source(recipe.model)
    refuse_compressed(source)
    whole, layerwise = check_structured(recipe, source)

    with staging_dir(target, overwrite, source=source) as staging:
        tick = time.perf_counter()
        if progress is not None:
            progress("load model", 0, 1)
        loaded = load_model(source, dtype=recipe.dtype, device="cpu", trust_remote_code=recipe.trust_remote_code,
                            allow_pickle=recipe.allow_pickle)
        model = loaded.model
        timings["load_s"] = time.perf_counter() - tick
        if progress is not None:
            progress("load model", 1, 1)
        parameters = parameter_count(model)

        tick = time.perf_counter()
        calibration, calibration_ids = _calibrate(recipe, loaded, say, progress)
        timings["calibration_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        structure = prune_structured(model, whole, calibration_ids, device=device, progress=progress)
        pruned_parameters = parameter_count(model)
        all_linears, in_blocks = list(find_linears(model)), select_layers(model, ignore=())  # before quantizing
        results = []
        if layerwise:
            layer_plan = [(p, select_layers(model, ignore=p.config.ignore)) for p in layerwise]
            check_layers(model, layer_plan)
            block_path, blocks = find_blocks(model)
            with torch.inference_mode():
                results = run_layerwise(model, block_path, blocks, layer_plan, device=device,
                                        input_ids=calibration_ids, progress=progress)
        timings["compress_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        _export(model, loaded, staging, recipe, all_linears, in_blocks, source=source)
        timings["export_s"] = time.perf_counter() - tick
        del model, loaded

        metrics, gates, size_before, size_after, ratio = finish_artifact(
            staging, recipe, source, calibration=calibration, parameters=parameters, results=results,
            timings=timings, progress=progress, extra_metrics={"parameters_after": pruned_parameters},
            extra_report={"parameters_after": pruned_parameters, "structured": structure})
    timings["total_s"] = time.perf_counter() - start
    fallback, why = per_channel_fallback(layer_plan, results) if layerwise else (0, None)
    result = RunResult(
        output=str(target), model=_display_source(source), parameters=parameters, size_before_bytes=size_before,
        size_after_bytes=size_after, compression_ratio=ratio, timings=timings, metrics=metrics,
        gates=[asdict(g) for g in gates], layers=len(results), calibration=calibration,
        parameters_after=pruned_parameters, per_channel_fallback=fallback, notes=[why] if why else [],
        structured=[{k: v for k, v in stage.items() if k not in ("blocks", "scores")} for stage in structure],
    )
    failed = [g.message for g in gates if not g.passed]
    if failed:
        raise GateFailed("; ".join(failed), report=result.to_dict())
    return result
