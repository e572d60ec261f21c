"""The in-memory engine: compress a model that is already loaded, with tokens already made, and no I/O.

``compress_model(model, stages, calibration)`` is what ``compress.run`` does between loading and export, as
a function a search (per-layer bit widths), a training loop (distillation) or a notebook can call many
times on the same model: no output folder, no tokenizer, no manifest, no evaluation. It validates the
stages against the model, runs them through the block sweep (``compress.pipeline.phases``: layer-wise
stages together, each structured stage in a sweep of its own, first) and returns the per-layer records.

``run`` stays load → calibration → ``compress_model`` → export → eval of the export, so what the engine
does is what ships.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from compress.core.errors import CompressError
from compress.core.records import LayerRecord, LayerRecords
from compress.models.blocks import find_blocks, select_layers
from compress.models.producers import linear_producers
from compress.passes import PASSES
from compress.passes.base import Pass, TransformPass
from compress.passes.prune.structured import StructuredPrune
from compress.passes.quantize.kv_cache import KVCachePass
from compress.pipeline.kv_cache_step import KVCacheStep
from compress.pipeline.phases import phase_checkpoint, run_phase, split_phases
from compress.pipeline.rotation import RotateStep, check_rotation
from compress.pipeline.sequential import Step
from compress.pipeline.stage_order import check_stage_order
from compress.pipeline.steps import PassStep
from compress.pipeline.structured import structured_step

Progress = Callable[[str, int, int], None]


class Records(list[LayerRecord]):
    """The sweep's history: one ``LayerRecord`` per layer per stage that solved it, in sweep order (what
    ``report.json`` lists), plus what does not fit one layer. ``layers`` merges it into one record per layer
    (what the export, the manifest and the card read)."""

    def __init__(self) -> None:
        super().__init__()
        self.structured: list[dict[str, Any]] = []
        """Per structured stage: what was asked and removed, per block what was kept, block scores."""
        self.stages: list[tuple[Pass, list[str]]] = []
        """Each layer-wise stage with the layers it targeted, on the model as the stages before left it."""
        self.notes: list[str] = []
        """What the stages did beyond what was asked, one sentence each (a head untied by a rotation)."""

    @property
    def layers(self) -> LayerRecords:
        """One record per compressed layer: every stage's record of it merged (``LayerRecord.then``)."""
        return LayerRecords(self)


def build_passes(stages: Sequence[Any]) -> list[Pass]:
    """The pass of each stage config (``Recipe.stages`` items, or plain dicts validated here)."""
    passes = []
    for stage in stages:
        if isinstance(stage, dict):
            method = stage.get("method")
            if method not in PASSES:
                raise CompressError(f"unknown method {method!r}; use one of {', '.join(PASSES.names())}")
            stage = PASSES.get(method).config_cls.model_validate(stage)
        passes.append(PASSES.get(stage.method)(stage))
    return passes


def needs_calibration(stages: Sequence[Any]) -> bool:
    """Whether any stage reads calibration data (RTN and magnitude pruning do not)."""
    return any(p.needs_calibration for p in build_passes(stages))


def check_layers(model: nn.Module, plan: Sequence[tuple[Pass, list[str]]]) -> None:
    """Every targeted layer accepts its pass, in an order that can work; fails before any work is done."""
    check_stage_order(plan)
    for layer_pass, names in plan:
        if layer_pass.changes_shapes or layer_pass.scope == "cache":  # no linear of its own
            continue
        if not names:
            raise CompressError(f"method {layer_pass.config.method} matched no linear layer (check --ignore)")
        for name in names:
            layer_pass.check_layer(name, model.get_submodule(name))


def layer_plan(model: nn.Module, passes: Sequence[Pass]) -> list[tuple[Pass, list[str]]]:
    """Each pass with the layers it targets on ``model`` (none for a shape-changing pass)."""
    return [(p, [] if p.changes_shapes or p.scope == "cache" else select_layers(model, ignore=p.config.ignore))
            for p in passes]


def _steps(model: nn.Module, block_path: str, passes: Sequence[Pass], records: Records) -> list[Step]:
    if passes[0].changes_shapes:
        assert isinstance(passes[0], StructuredPrune) and len(passes) == 1
        return [structured_step(passes[0])]
    plan = layer_plan(model, passes)
    check_layers(model, plan)  # on the model as the sweeps before left it (a structured stage changes widths)
    records.stages.extend(plan)
    return [RotateStep(p, block_path) if isinstance(p, TransformPass)
            else KVCacheStep(p) if isinstance(p, KVCachePass) else PassStep(p, names, block_path)
            for p, names in plan]


def compress_model(model: nn.Module, stages: Sequence[Any], calibration: torch.Tensor | None = None, *,
                   device: torch.device | str = "cpu", checkpoint=None, prepare_block: Callable[[int], None] | None = None,
                   progress: Progress | None = None, log: Callable[[str], None] | None = None,
                   true_sequential: bool = False) -> tuple[nn.Module, Records]:
    """Compress ``model`` in place with ``stages`` and return it with the per-layer records (``Records``:
    one per layer per stage, ``records.layers`` one per layer; ``structured`` holds what structured stages
    removed).

    ``calibration``: token ids ``[samples, seq_len]`` (needed when a stage is calibrated). ``checkpoint``:
    a ``pipeline.resume.SweepCheckpoint`` to save each block (``--resume``). ``prepare_block(i)`` is called
    right before block ``i`` is first used (streamed loading reads its weights then). ``true_sequential``:
    see ``CalibrationConfig.true_sequential``."""
    passes = build_passes(stages)
    check_rotation(model.config, passes)
    block_path, blocks = find_blocks(model)  # once: a block whose linears are all quantized no longer looks like one
    producers = None
    if any(p.rewrites_producers for p in passes):
        producers = linear_producers(model.config, model, block_path, blocks)
    check_stage_order(layer_plan(model, passes), producers)
    if calibration is None and any(p.needs_calibration for p in passes):
        raise CompressError("these stages need calibration token ids; pass calibration=[samples, seq_len] ids")
    records = Records()
    with torch.inference_mode():
        for number, phase in enumerate(split_phases(passes)):
            steps = _steps(model, block_path, phase, records)
            results, entries = run_phase(
                model, block_path, steps, phase_checkpoint(checkpoint, number), log=log, device=torch.device(device),
                input_ids=calibration, prepare_block=prepare_block, progress=progress,
                true_sequential=true_sequential)
            records.extend(results)
            records.structured.extend(entries)
            records.notes.extend(note for step in steps for note in getattr(step, "notes", ()))
            prepare_block = None  # the first sweep read every block; later ones find them loaded
    return model, records
