"""A recipe's stages as sweeps, and ``--resume`` for each of them.

Consecutive layer-wise stages share one sweep (each block: stage 1's solve, stage 2's, ..., then one
propagation), so quantizing after pruning costs one pass over the model. A stage that changes shapes runs
in a sweep of its own (``Step.alone``): the stages after it must see the smaller model, and a block drop
only applies once every block has been scored.

Resume works per sweep and per block, for every kind of step. Each sweep keeps its checkpoint in its own
folder (the first in the partial folder itself, as before; later ones in ``phase-<n>/``), written by
``compress.pipeline.resume.SweepCheckpoint`` (a block's tensors, the next block's inputs, the layer
records, ``LayerRecord.to_dict``). Next to it, ``steps-<block>.json`` keeps what the tensors do not say: each step's per-block state
(the channels or heads a block kept, a block's score) and how to rebuild modules whose shape changed. It
is written before the block's ``progress.json``, so it is never older than the block it describes. On
resume a finished sweep is restored whole and its ``finish`` replayed (a config edit, the same blocks
dropped, decided from the restored scores), then the interrupted sweep continues at its next block.
This is sound for shape changes too: each block's checkpoint holds the sliced tensors and descriptors of
the smaller layers, and the config is only changed in ``finish``, after every block is restored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from compress.core.errors import CompressError
from compress.core.records import LayerRecord
from compress.passes.base import Pass
from compress.pipeline.resume import SweepCheckpoint, describe, rebuild
from compress.pipeline.sequential import BlockContext, Step, swap_module, sweep

Log = Callable[[str], None]


def split_phases(passes: Sequence[Pass]) -> list[list[Pass]]:
    """Consecutive layer-wise passes together; every shape-changing pass alone."""
    phases: list[list[Pass]] = []
    for layer_pass in passes:
        if layer_pass.changes_shapes or not phases or phases[-1][-1].changes_shapes:
            phases.append([layer_pass])
        else:
            phases[-1].append(layer_pass)
    return phases


def phase_checkpoint(root: SweepCheckpoint | None, number: int) -> SweepCheckpoint | None:
    """The checkpoint of sweep ``number`` of a resumable run (the first keeps the historical layout)."""
    if root is None or number == 0:
        return root
    folder = root.folder / f"phase-{number}"
    folder.mkdir(parents=True, exist_ok=True)
    child = SweepCheckpoint(folder, root.recipe_sha256)
    child.enabled = root.enabled
    if root.fingerprint is not None:
        child.check_calibration(root.fingerprint)
    return child


def _sidecar(checkpoint: SweepCheckpoint, index: int) -> Path:
    return checkpoint.folder / f"steps-{index:05d}.json"


def _write_sidecar(checkpoint: SweepCheckpoint, index: int, data: dict[str, Any]) -> None:
    path = _sidecar(checkpoint, index)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, sort_keys=True))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_sidecar(checkpoint: SweepCheckpoint, index: int) -> dict[str, Any]:
    path = _sidecar(checkpoint, index)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CompressError(f"the resume state {path} is unreadable; delete {checkpoint.folder} to start over") from None
    return data if isinstance(data, dict) else {}


def _saver(model: nn.Module, steps: Sequence[Step], checkpoint: SweepCheckpoint):
    def on_block(index: int, block: nn.Module, ctx: BlockContext, hidden: list[Tensor] | None,
                 states: list[dict[str, Any] | None]) -> None:
        if not checkpoint.enabled:
            return
        recorded = {r.name for r in ctx.results}
        shaped = {}
        for name in dict.fromkeys(n for n in ctx.changed if n not in recorded):
            desc = describe(model.get_submodule(name))
            if desc is None:
                checkpoint.enabled = False  # as SweepCheckpoint does for a layer type it cannot rebuild
                return
            shaped[name] = desc
        if shaped or any(state is not None for state in states):
            _write_sidecar(checkpoint, index, {"modules": shaped, "states": states})
        checkpoint.save(index, model, block, ctx.results, hidden)

    return on_block


def _restore(model: nn.Module, blocks: nn.ModuleList, steps: Sequence[Step], checkpoint: SweepCheckpoint):
    """Swap in what every completed block needs rebuilt, restore them, and hand each step its states."""
    sidecars = [_read_sidecar(checkpoint, i) for i in range(checkpoint.completed)]
    for data in sidecars:
        for name, desc in data.get("modules", {}).items():
            swap_module(model, name, rebuild(desc))
    restored = checkpoint.restore(model, blocks)
    if restored is None:
        return None
    for index, data in enumerate(sidecars):
        states = data.get("states") or [None] * len(steps)
        if len(states) != len(steps):
            raise CompressError(f"the resume state in {checkpoint.folder} was written for other stages; delete "
                                "that folder to start over")
        for step, state in zip(steps, states, strict=True):
            step.restore_block(index, blocks[index], state)
    return restored


def run_phase(model: nn.Module, block_path: str, steps: Sequence[Step], checkpoint: SweepCheckpoint | None, *,
              log: Log | None = None, **kwargs: Any) -> tuple[list[LayerRecord], list[dict[str, Any]]]:
    """One sweep of ``steps`` over the blocks at ``block_path``, continued from its checkpoint and
    checkpointing each new block; returns the layer records and the steps' ``finish`` entries."""
    for step in steps:
        step.start(model)
    blocks = model.get_submodule(block_path)
    total = len(blocks)
    restored = _restore(model, blocks, steps, checkpoint) if checkpoint is not None else None
    results = list(restored.results) if restored is not None else []
    if restored is not None and log is not None:
        log(f"resuming after block {restored.start_block} of {total} from {checkpoint.folder}")
    start = restored.start_block if restored is not None else 0
    if start < total:
        try:
            results += sweep(model, block_path, steps, start_block=start, start_hidden=restored.hidden if restored else None,
                             on_block=_saver(model, steps, checkpoint) if checkpoint is not None else None,
                             **kwargs)
        except KeyboardInterrupt:
            if log is not None and checkpoint is not None and checkpoint.completed:
                log(f"{checkpoint.completed} of {total} blocks are saved in {checkpoint.folder}; run the same "
                    "command with --resume to continue")
            raise
    entries = [entry for entry in (step.finish(model) for step in steps) if entry is not None]
    return results, entries
