"""``compress.run``: the one path from a Recipe to an evaluated artifact, for every recipe.

load model → calibration tokens (only when a stage reads data) → ``compress_model`` (the block sweep:
structured stages first, each in a sweep of its own, then the layer-wise ones together) → export (temporary
folder) → eval of the export → manifest → rename into place (``compress.pipeline.artifact``). The CLI
commands are thin wrappers that build a Recipe and call this.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from compress.calibrate.data import calibration_samples
from compress.core.errors import CompressError, GateFailed
from compress.evaluate.size import parameter_count
from compress.models.blocks import select_layers
from compress.models.load import (
    LoadedModel,
    check_model_folder,
    load_config,
    load_model,
    load_model_streaming,
    resolve_model_source,
)
from compress.passes.base import Pass
from compress.pipeline.artifact import (
    check_export,
    display_source,
    finish_artifact,
    linear_names,
    recorded,
    write_export,
)
from compress.pipeline.engine import build_passes as engine_passes
from compress.pipeline.engine import check_layers, compress_model, layer_plan
from compress.pipeline.evaluation import check_before_load, context_length, is_compressed
from compress.pipeline.output_dir import output_path, partial_dir, staging_dir
from compress.pipeline.resume import open_checkpoint
from compress.pipeline.rotation import check_rotation
from compress.pipeline.stage_order import check_recipe_order
from compress.pipeline.structured import check_structured
from compress.recipes.loader import dump_recipe
from compress.recipes.schema import Recipe

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


def per_channel_fallback(plan, results: list) -> tuple[int, str | None]:
    """How many quantized layers fell back to per-channel scales (``indivisible: per-channel``), and why."""
    width = {r.name: r.in_features for r in results}
    fell: dict[str, int] = {}
    total, group = 0, 0
    for layer_pass, names in plan:
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


def build_passes(recipe: Recipe) -> list[Pass]:
    return engine_passes(recipe.stages)


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




def check_recipe(recipe: Recipe, source: str) -> list[dict[str, Any]]:
    """Every refusal the config alone can decide (stage order, structured feasibility, export layout), before
    any folder is created or weight read; returns what each structured stage will remove."""
    config = load_config(source, trust_remote_code=recipe.trust_remote_code)
    check_recipe_order(recipe, config, trust_remote_code=recipe.trust_remote_code)
    check_rotation(config, build_passes(recipe))
    return check_structured(recipe, config, build_passes(recipe))


def run(recipe: Recipe, out_dir: str | Path | None = None, *, overwrite: bool = False,
        progress: Progress | None = None, log: Log | None = None, resume: bool = False) -> RunResult:
    """Run ``recipe`` and write the artifact to ``out_dir`` (default: ``recipe.output`` or
    ``./compressed/<model>-<scheme>``). ``resume``: checkpoint every block and continue an interrupted
    run of the same recipe (``compress.pipeline.phases``)."""
    check_before_load(recipe)  # datasets, gates and eval text: refused before any weights are read
    say = log or (lambda message: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    target = output_path(out_dir) if out_dir is not None else default_output(recipe)
    device = resolve_device(recipe.device)
    source = resolve_model_source(recipe.model)
    refuse_compressed(source)
    structured = check_recipe(recipe, source)

    if not resume and partial_dir(target).is_dir():
        say(f"ignoring the interrupted run in {partial_dir(target)} (pass --resume to continue it)")
    with staging_dir(target, overwrite, resumable=resume, source=source) as staging:
        checkpoint = open_checkpoint(partial_dir(target), recorded(recipe).model_dump(mode="json"), resume)
        tick = time.perf_counter()
        if progress is not None:
            progress("load model", 0, 1)
        loaded, prepare_block = _load(recipe, source)
        model = loaded.model
        timings["load_s"] = time.perf_counter() - tick
        if progress is not None:
            progress("load model", 1, 1)
        parameters = parameter_count(model)
        in_blocks = select_layers(model, ignore=())
        if not structured:  # layer shapes are final: refuse a layer that cannot take its pass before any data
            plan = layer_plan(model, build_passes(recipe))
            check_layers(model, plan)
            check_export(recipe, model, [(p, names) for p, names in plan if p.scope != "transform"], in_blocks)

        tick = time.perf_counter()
        calibration, calibration_ids = None, None
        if any(p.needs_calibration for p in build_passes(recipe)):  # RTN and magnitude read no data
            calibration, calibration_ids = _calibrate(recipe, loaded, say, progress)
        timings["calibration_s"] = time.perf_counter() - tick
        if checkpoint is not None:
            checkpoint.check_calibration(calibration["fingerprint"] if calibration else "none")

        tick = time.perf_counter()
        model, records = compress_model(model, recipe.stages, calibration_ids, device=device, checkpoint=checkpoint,
                                        prepare_block=prepare_block, progress=progress, log=say,
                                        true_sequential=recipe.calibration.true_sequential)
        timings["compress_s"] = time.perf_counter() - tick
        after = parameter_count(model) if records.structured else None
        extra = {"parameters_after": after, "structured": records.structured} if records.structured else None

        tick = time.perf_counter()
        write_export(model, loaded, staging, recipe, linear_names(model), in_blocks, source=source,
                     records=records.layers)
        timings["export_s"] = time.perf_counter() - tick
        del model, loaded

        metrics, gates, size_before, size_after, ratio = finish_artifact(
            staging, recipe, source, calibration=calibration, parameters=parameters, results=records,
            timings=timings, progress=progress, extra_metrics={"parameters_after": after} if extra else None,
            extra_report=extra)
    timings["total_s"] = time.perf_counter() - start
    fallback, why = per_channel_fallback(records.stages, records)
    result = RunResult(
        output=str(target), model=display_source(source), parameters=parameters,
        size_before_bytes=size_before, size_after_bytes=size_after, compression_ratio=ratio,
        timings=timings, metrics=metrics, gates=[asdict(g) for g in gates], layers=len(records.layers),
        calibration=calibration, parameters_after=after, per_channel_fallback=fallback,
        notes=[*records.notes, *([why] if why else [])],
        structured=[{k: v for k, v in stage.items() if k not in ("blocks", "scores")} for stage in records.structured],
    )
    failed = [g.message for g in gates if not g.passed]
    if failed:
        raise GateFailed("; ".join(failed), report=result.to_dict())
    return result


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


def dry_run(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe and the layers it would touch, from the config alone (no weights loaded)."""
    from compress.models.blocks import plan_layers

    source = resolve_model_source(recipe.model)
    refuse_compressed(source)
    check_before_load(recipe)  # datasets, gates and eval text, as run() refuses them
    structured = check_recipe(recipe, source)  # what a run would refuse, and what structured stages remove
    config = load_config(source, trust_remote_code=recipe.trust_remote_code)
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
    return {"recipe": yaml.safe_load(dump_recipe(recipe)), "model": display_source(source),
            "output": str(default_output(recipe)), "stages": stages, **({"structured": structured} if structured else {})}
