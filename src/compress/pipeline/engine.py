"""The in-memory engine: compress a model that is already loaded, with tokens already made, and no I/O.

``compress_model(model, stages, calibration)`` is what ``compress.run`` does between loading and export, as
a function a search (per-layer bit widths), a training loop (distillation) or a notebook can call many
times on the same model: no output folder, no tokenizer, no manifest, no evaluation. It validates the
stages against the model, runs the one block sweep and returns the per-layer records.

``run`` stays load → calibration → ``compress_model`` → export → eval of the export, so what the engine
does is what ships.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from compress.core.errors import CompressError
from compress.models.blocks import find_blocks, select_layers
from compress.passes import PASSES, LayerPass
from compress.pipeline.sequential import LayerResult, check_layers

Progress = Callable[[str, int, int], None]


def layer_passes(stages: Sequence[Any]) -> list[LayerPass]:
    """The pass of each stage config (``Recipe.stages`` items, or plain dicts validated here)."""
    passes = []
    for stage in stages:
        if isinstance(stage, dict):
            method = stage.get("method")
            if method not in PASSES:
                raise CompressError(f"unknown method {method!r}; use one of {', '.join(PASSES.names())}")
            stage = PASSES.get(method).config_cls.model_validate(stage)
        layer_pass = PASSES.get(stage.method)(stage)
        if not isinstance(layer_pass, LayerPass):
            raise CompressError(f"method {stage.method} changes the model's shape; compress_model runs layer-wise "
                                "stages only (use compress.run for structured pruning)")
        passes.append(layer_pass)
    return passes


def needs_calibration(stages: Sequence[Any]) -> bool:
    """Whether any stage reads calibration data (RTN and magnitude pruning do not)."""
    return any(p.needs_calibration for p in layer_passes(stages))


def compress_model(model: nn.Module, stages: Sequence[Any], calibration: torch.Tensor | None = None, *,
                   device: torch.device | str = "cpu", checkpoint=None, prepare_block: Callable[[int], None] | None = None,
                   progress: Progress | None = None, log: Callable[[str], None] | None = None,
                   true_sequential: bool = False) -> tuple[nn.Module, list[LayerResult]]:
    """Compress ``model`` in place with ``stages`` and return it with one record per compressed layer.

    ``calibration``: token ids ``[samples, seq_len]`` (needed when a stage is calibrated). ``checkpoint``:
    a ``pipeline.resume.SweepCheckpoint`` to save each block (``--resume``). ``prepare_block(i)`` is called
    right before block ``i`` is used (streamed loading reads its weights then). ``true_sequential``: see
    ``CalibrationConfig.true_sequential``."""
    from compress.pipeline.resume import resumable_sweep

    passes = layer_passes(stages)
    plan = [(p, select_layers(model, ignore=p.config.ignore)) for p in passes]
    check_layers(model, plan)
    if calibration is None and any(p.needs_calibration for p in passes):
        raise CompressError("these stages need calibration token ids; pass calibration=[samples, seq_len] ids")
    block_path, blocks = find_blocks(model)
    with torch.inference_mode():
        records = resumable_sweep(model, block_path, blocks, plan, checkpoint, log=log, device=torch.device(device),
                                  input_ids=calibration, prepare_block=prepare_block, progress=progress,
                                  true_sequential=true_sequential)
    return model, records
