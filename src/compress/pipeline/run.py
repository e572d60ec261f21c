"""``compress.run``: the one path from a Recipe to an evaluated artifact.

load model → calibration tokens → block sweep (passes) → export (temporary folder) → eval of the export
→ manifest → rename into place. The CLI commands are thin wrappers that build a Recipe and call this.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from compress.calibrate.data import calibration_samples
from compress.core.errors import CompressError, GateFailed
from compress.evaluate.gates import check_gates
from compress.evaluate.size import dir_size_bytes, parameter_count
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
from compress.models.blocks import find_linears, select_layers
from compress.models.load import (
    LoadedModel,
    check_model_folder,
    load_config,
    load_model,
    load_model_streaming,
    resolve_model_source,
)
from compress.passes import PASSES, LayerPass
from compress.pipeline.engine import compress_model
from compress.pipeline.evaluation import check_before_load, context_length, evaluate_artifact, is_compressed
from compress.pipeline.output_dir import output_path, partial_dir, staging_dir
from compress.pipeline.resume import open_checkpoint
from compress.pipeline.sequential import check_layers
from compress.pipeline.stage_order import check_recipe_order
from compress.recipes.loader import dump_recipe
from compress.recipes.schema import Recipe, parse_size

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


@dataclass
class RunResult:
    output: str
    model: str
    parameters: int
    size_before_bytes: int
    size_after_bytes: int
    compression_ratio: float
    timings: dict[str, float]
    metrics: dict[str, Any]
    gates: list[dict[str, Any]] = field(default_factory=list)
    layers: int = 0
    calibration: dict[str, Any] | None = None
    parameters_after: int | None = None
    """Structured runs: the smaller model's parameter count (``parameters`` is the original's)."""
    structured: list[dict[str, Any]] = field(default_factory=list)
    """Structured runs: per stage, what was asked and what was removed (``summary``: one sentence)."""
    per_channel_fallback: int = 0
    """Layers quantized per channel because the group size does not divide their width (``indivisible``)."""
    notes: list[str] = field(default_factory=list)
    """What was done differently from what was asked, one sentence each (the CLI prints them)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def per_channel_fallback(layer_plan, results: list) -> tuple[int, str | None]:
    """How many quantized layers fell back to per-channel scales (``indivisible: per-channel``), and why."""
    width = {r.name: r.in_features for r in results}
    fell: dict[str, int] = {}
    total, group = 0, 0
    for layer_pass, names in layer_plan:
        scheme_for = getattr(layer_pass.config, "scheme_for", None)
        if scheme_for is None:
            continue
        asked = layer_pass.config.scheme
        for name in (n for n in names if n in width):
            total += 1
            if scheme_for(width[name]) != asked:
                fell[name], group = width[name], asked.group_size
    if not fell:
        return 0, None
    widths = ", ".join(map(str, sorted(set(fell.values()))))
    return len(fell), (f"{len(fell)} of {total} layers quantized per channel instead of in groups of {group}: "
                       f"their input width ({widths}) is not a multiple of {group} (indivisible: per-channel)")


def build_passes(recipe: Recipe) -> list[LayerPass]:
    return [PASSES.get(stage.method)(stage) for stage in recipe.stages]


def scheme_tag(recipe: Recipe) -> str:
    return "-".join(p.describe() for p in build_passes(recipe))


def model_name(source: str) -> str:
    from compress.models.load import DEMO_MODEL_DIR

    if Path(source).resolve() == Path(DEMO_MODEL_DIR).resolve():
        return "demo"
    return Path(source.rstrip("/")).name or "model"


def default_output(recipe: Recipe) -> Path:
    if recipe.output is not None:
        return output_path(recipe.output)
    source = resolve_model_source(recipe.model)
    return Path("compressed") / f"{model_name(source)}-{scheme_tag(recipe)}"


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda was asked for but no CUDA device is available")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)




def plan(recipe: Recipe, model: torch.nn.Module) -> list[tuple[LayerPass, list[str]]]:
    return [(p, select_layers(model, ignore=p.config.ignore)) for p in build_passes(recipe)]


def run(recipe: Recipe, out_dir: str | Path | None = None, *, overwrite: bool = False,
        progress: Progress | None = None, log: Log | None = None, resume: bool = False) -> RunResult:
    """Run ``recipe`` and write the artifact to ``out_dir`` (default: ``recipe.output`` or
    ``./compressed/<model>-<scheme>``). ``resume``: checkpoint every block and continue an interrupted
    run of the same recipe (``compress.pipeline.resume``)."""
    from compress.pipeline.structured import is_structured, run_structured  # it builds on this module

    check_before_load(recipe)  # datasets, gates and eval text: refused before any weights are read

    if is_structured(recipe) and resume:
        raise CompressError("--resume is not supported for structured pruning yet; run without it")
    if is_structured(recipe):  # whole-model stages change the shape: their own sweep, same artifact
        return run_structured(recipe, out_dir, overwrite=overwrite, progress=progress, log=log)
    say = log or (lambda message: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    target = output_path(out_dir) if out_dir is not None else default_output(recipe)
    device = resolve_device(recipe.device)
    source = resolve_model_source(recipe.model)
    refuse_compressed(source)
    check_recipe_order(recipe, load_config(source, trust_remote_code=recipe.trust_remote_code),
                       trust_remote_code=recipe.trust_remote_code)

    if not resume and partial_dir(target).is_dir():
        say(f"ignoring the interrupted run in {partial_dir(target)} (pass --resume to continue it)")
    with staging_dir(target, overwrite, resumable=resume, source=source) as staging:
        checkpoint = open_checkpoint(partial_dir(target), _recorded(recipe).model_dump(mode="json"), resume)
        tick = time.perf_counter()
        if progress is not None:
            progress("load model", 0, 1)
        loaded, prepare_block = _load(recipe, source)
        model = loaded.model
        timings["load_s"] = time.perf_counter() - tick
        if progress is not None:
            progress("load model", 1, 1)
        parameters = parameter_count(model)
        all_linears = list(find_linears(model))
        layer_plan = plan(recipe, model)
        check_layers(model, layer_plan)
        in_blocks = select_layers(model, ignore=())
        check_export(recipe, model, layer_plan, in_blocks)

        tick = time.perf_counter()
        calibration, calibration_ids = None, None
        if any(p.needs_calibration for p, _ in layer_plan):  # RTN and magnitude read no data: none is built
            calibration, calibration_ids = _calibrate(recipe, loaded, say, progress)
        timings["calibration_s"] = time.perf_counter() - tick
        if checkpoint is not None:
            checkpoint.check_calibration(calibration["fingerprint"] if calibration else "none")

        tick = time.perf_counter()
        model, results = compress_model(model, recipe.stages, calibration_ids, device=device, checkpoint=checkpoint,
                                        prepare_block=prepare_block, progress=progress, log=say,
                                        true_sequential=recipe.calibration.true_sequential)
        timings["compress_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        _export(model, loaded, staging, recipe, all_linears, in_blocks, source=source)
        timings["export_s"] = time.perf_counter() - tick
        del model, loaded

        metrics, gates, size_before, size_after, ratio = finish_artifact(
            staging, recipe, source, calibration=calibration, parameters=parameters, results=results,
            timings=timings, progress=progress)
    timings["total_s"] = time.perf_counter() - start
    fallback, why = per_channel_fallback(layer_plan, results)
    result = RunResult(
        output=str(target), model=_display_source(source), parameters=parameters,
        size_before_bytes=size_before, size_after_bytes=size_after, compression_ratio=ratio,
        timings=timings, metrics=metrics, gates=[asdict(g) for g in gates], layers=len(results),
        calibration=calibration, per_channel_fallback=fallback, notes=[why] if why else [],
    )
    failed = [g.message for g in gates if not g.passed]
    if failed:
        raise GateFailed("; ".join(failed), report=result.to_dict())
    return result


def finish_artifact(staging: Path, recipe: Recipe, source: str, *, calibration: dict[str, Any], parameters: int,
                    results: list, timings: dict[str, float], progress: Progress | None = None,
                    extra_metrics: dict[str, Any] | None = None, extra_report: dict[str, Any] | None = None,
                    ) -> tuple[dict[str, Any], list, int, int, float]:
    """Eval of the exported folder, gates, then report.json, the model card and (last, so it hashes them)
    manifest.json: the tail every kind of run shares. Returns (metrics, gates, size before, after, ratio)."""
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
        "source_model": _display_source(source),
        "parameters": parameters,
        "size_before_bytes": size_before,
        "size_after_bytes": size_after,
        "layers": [asdict(r) for r in results],
        "eval": metrics,
        "gates": [asdict(g) for g in gates],
        **(extra_report or {}),
    }
    (staging / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    recorded = _recorded(recipe).model_dump(mode="json")
    write_card(staging, source_model=_display_source(source), recipe=recorded, calibration=calibration,
               evaluation=metrics or None, layers=report["layers"], tool_version=tool_version())
    write_manifest(staging, source_model=_display_source(source), recipe=recorded, calibration=calibration,
                   evaluation=metrics or None)
    return metrics, gates, size_before, size_after, ratio


def _display_source(source: str) -> str:
    from compress.models.load import DEMO_MODEL_DIR

    return "demo (embedded)" if Path(source).resolve() == Path(DEMO_MODEL_DIR).resolve() else source


def _load(recipe: Recipe, source: str) -> tuple[LoadedModel, Callable[[int], None] | None]:
    """Stream blocks from disk when the checkpoint allows it (memory follows one block), else load eagerly."""
    streamed = None
    if recipe.stream:
        streamed = load_model_streaming(source, dtype=recipe.dtype, trust_remote_code=recipe.trust_remote_code)
    if streamed is None:
        loaded = load_model(source, dtype=recipe.dtype, device="cpu",
                            trust_remote_code=recipe.trust_remote_code, allow_pickle=recipe.allow_pickle)
        return loaded, None
    loaded, lazy, block_path = streamed
    return loaded, lambda index: lazy.load(f"{block_path}.{index}")


def refuse_compressed(source: str) -> None:
    if Path(source).is_dir():  # corrupt weights are named as such, not mistaken for a compressed checkpoint
        check_model_folder(source, Path(source))
    if is_compressed(source):
        raise CompressError(f"model {source} is already a compressed checkpoint; compress its original model instead")


def _calibrate(recipe: Recipe, loaded: LoadedModel, say: Log,
               progress: Progress | None) -> tuple[dict[str, Any], torch.Tensor]:
    """Calibration tokens: always built (and fingerprinted) so bad data fails the same way for every method."""
    cal = recipe.calibration
    seq_len = cal.seq_len or min(2048, context_length(loaded.model.config))
    samples = calibration_samples(loaded.tokenizer, cal.dataset, cal.num_samples, seq_len, seed=cal.seed,
                                  progress=progress, doc_separator=cal.doc_separator)
    if samples.overlapping:
        say(f"calibration: {cal.dataset} has {samples.total_tokens:,} tokens, fewer than the "
            f"{cal.num_samples * seq_len:,} of {cal.num_samples} samples x {seq_len}; samples overlap")
    return {"dataset": cal.dataset, "num_samples": cal.num_samples, "seq_len": seq_len, "seed": cal.seed,
            "tokens": int(samples.input_ids.numel()), "fingerprint": samples.fingerprint}, samples.input_ids


def _export(model, loaded: LoadedModel, staging: Path, recipe: Recipe, all_linears, in_blocks: list[str], *,
            source: str | None = None) -> None:
    """Weights, config, generation config, tokenizer, the recorded recipe and, for a sentence-transformers
    source, its pipeline files (modules.json, 1_Pooling/, ...) so ``SentenceTransformer(out)`` opens it."""
    sparse_format = recipe.export.sparse_format
    tensors = checkpoint_tensors(model, sparse_format)
    quant_config = quantization_config(model, all_linears, sparse_format)
    if recipe.export.format == "gptq":
        tensors, quant_config = _gptq_layout(model, tensors, recipe, in_blocks)
        write_quantize_config(staging, quant_config)
    write_weights(tensors, staging, parse_size(recipe.export.max_shard_size),
                  stem=BITMASK_PREFIX if sparse_format == "bitmask" and sparse_modules(model) else "model")
    write_config(model.config, staging, quant_config)
    generation = getattr(model, "generation_config", None)
    if generation is not None and loaded.kind == "causal-lm":
        generation.save_pretrained(str(staging))
    loaded.tokenizer.save_pretrained(str(staging))
    if source is not None:
        copy_sentence_transformers_files(source, staging)
    (staging / "recipe.yaml").write_text(dump_recipe(_recorded(recipe)))


def _gptq_layout(model, tensors: dict[str, torch.Tensor], recipe: Recipe,
                 in_blocks: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The same codes re-arranged as GPTQ tensors; refuses what that layout cannot express (FORMATS.md)."""
    schemes = {name: module.scheme for name, module in quantized_modules(model).items()}
    stage = recipe.stages[0].model_dump()
    meta = {k: stage[k] for k in ("damp", "static_groups") if k in stage}
    meta = {("damp_percent" if k == "damp" else k): v for k, v in meta.items()}
    if stage.get("method") == "gptq":
        meta["true_sequential"] = True
    return to_gptq(tensors, schemes, dense_in_blocks=[n for n in in_blocks if n not in schemes], meta=meta)


def check_export(recipe: Recipe, model: torch.nn.Module, layer_plan, in_blocks: list[str]) -> None:
    """Refuse an export the target layout cannot express before any compute is spent on it."""
    if recipe.export.format != "gptq":
        return
    from compress.models.blocks import find_linears

    linears = find_linears(model)
    schemes = {}
    for layer_pass, names in layer_plan:
        scheme_for = getattr(layer_pass.config, "scheme_for", None)
        if scheme_for is None:
            raise CompressError(f"method {layer_pass.config.method} does not quantize, so it has no GPTQ layout")
        for name in names:
            lin = linears[name]
            schemes[name] = scheme_for(lin.in_features)
            check_expressible(name, schemes[name], lin.out_features, lin.in_features)
    single_scheme(schemes)
    check_no_dense_in_blocks(n for n in in_blocks if n not in schemes)


def _recorded(recipe: Recipe) -> Recipe:
    """The recipe as stored in the artifact: how it was made, not where it was written (so the same job
    gives the same bytes wherever its output goes)."""
    return recipe.model_copy(update={"output": None})


def _source_size(source: str) -> int:
    path = Path(source)
    if path.is_dir():
        return dir_size_bytes(path)
    return 0


def dry_run(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe and the layers it would touch, from the config alone (no weights loaded)."""
    from compress.models.blocks import plan_layers
    from compress.pipeline.structured import is_structured, plan_structured

    source = resolve_model_source(recipe.model)
    refuse_compressed(source)
    check_before_load(recipe)  # datasets, gates and eval text, as run() refuses them
    structured = []
    if is_structured(recipe):  # the refusals a structured run would hit, and what it removes, from the config
        structured = plan_structured(recipe, source)
    config = load_config(source, trust_remote_code=recipe.trust_remote_code)
    if not is_structured(recipe):
        check_recipe_order(recipe, config, trust_remote_code=recipe.trust_remote_code)
    stages = []
    for layer_pass in build_passes(recipe):
        layers = plan_layers(config, ignore=layer_pass.config.ignore)
        scheme_for = getattr(layer_pass.config, "scheme_for", None)
        for name, in_features, _ in layers:
            if scheme_for is not None:
                scheme_for(in_features).check_layer(name, in_features)
        tag = layer_pass.describe()
        stages.append({"method": layer_pass.config.method, "scheme": tag, "layers": [
            {"name": n, "in_features": i, "out_features": o, "scheme": scheme_for(i).tag if scheme_for else tag}
            for n, i, o in layers]})
    return {"recipe": yaml.safe_load(dump_recipe(recipe)), "model": _display_source(source),
            "output": str(default_output(recipe)), "stages": stages, **({"structured": structured} if structured else {})}
