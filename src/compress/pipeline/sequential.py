"""The block sweep: the one loop every stage runs in, quantizers, pruners and structured pruning alike.

Calibration batches run through the embeddings once and block 0's inputs are captured. Then, for each
block in order: move it to the compute device; let each step collect the statistics it needs and solve
(``Step.run_block``: a layer at a time, a group of layers sharing an input, or the whole block); run the
block once more on its inputs to produce the next block's inputs (``Step.observe`` sees each batch's input
and output there), so every block is calibrated on what the compressed model will really feed it; then
``on_block`` (the resume checkpoint) and the progress callback. After the last block, ``Step.finish``
(run by the engine) applies what needs the whole model (a config edit, dropping blocks).

Only the current block is on the device; captured activations live on the offload device (the CPU by
default). A sweep of data-free steps (RTN, magnitude) captures nothing and runs no forward at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from compress.calibrate.capture import BlockInput, block_output, capture_block_inputs, forward_batch_size
from compress.core.errors import CompressError
from compress.core.records import FACT_FIELDS, LayerRecord, LayerRecords
from compress.kernels.quant_linear import QuantLinear
from compress.pipeline.groups import BlockGroups, MakeStats, collect_stats, execution_groups

Progress = Callable[[str, int, int], None]
BlockDone = Callable[[int, nn.Module, "BlockContext", "list[Tensor] | None", "list[dict[str, Any] | None]"], None]


def swap_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def layer_record(name: str, module: nn.Module, *, original: Tensor, method: str, tag: str,
                 facts: Mapping[str, Any]) -> LayerRecord:
    """One stage's record of one layer: what ``module`` holds plus what the pass said about making it."""
    unknown = sorted(set(facts) - set(FACT_FIELDS))
    if unknown:
        raise CompressError(f"method {method} records {unknown[0]!r} for layer {name}; a pass may state only "
                            f"{', '.join(FACT_FIELDS)}")
    out_features, in_features = original.shape
    quantized = isinstance(module, QuantLinear)
    return LayerRecord(name=name, methods=(method,), tags=(tag,), in_features=in_features,
                       out_features=out_features, scheme=module.scheme if quantized else None,
                       format=module.format if quantized else None, **facts,
                       rel_weight_error=_relative_error(original, module))


def _relative_error(original: Tensor, module: nn.Module) -> float | None:
    dequantized = getattr(module, "dequantized_weight", None)
    if dequantized is None:
        return None
    reference = original.float()
    denom = reference.norm().item()
    return (dequantized(torch.float32).to(reference.device) - reference).norm().item() / max(denom, 1e-12)


class Step:
    """One stage as the sweep drives it. The hooks, in the order the sweep calls them:

    ``start(model)`` once before block 0 (plan what to remove; may refuse); per block ``run_block(ctx)``
    (collect statistics through ``ctx.probe`` / ``ctx.collect``, solve, swap through ``ctx.replace``), then
    ``observe(index, hidden_in, hidden_out)`` per calibration batch while the block produces the next
    block's inputs, then ``after_block(index, block)`` (returns JSON the resume checkpoint keeps, handed
    back through ``restore_block`` on resume); ``finish(model)`` once after the last block (a report
    entry or None).
    """

    method: str = ""
    label: str = "compress blocks"
    """The progress counter of a sweep made of this step alone."""
    needs_calibration: bool = True
    alone: bool = False
    """Run in a sweep of its own: the step changes shapes (later stages must see the smaller model) or
    needs every block done before its result applies (dropping blocks)."""
    one_sample_forwards: bool = False
    """Calibrate with one sample per forward instead of batches: the structured steps keep the batching
    their outputs were made with (batched forwards change their float sums, hence their bytes)."""
    observes_outputs: bool = False
    """``observe`` needs the outputs of every block, the last one included."""

    def start(self, model: nn.Module) -> None:  # noqa: B027 (optional hook)
        """Before block 0, on the model as earlier sweeps left it."""

    def run_block(self, ctx: BlockContext) -> None:  # noqa: B027
        """Collect statistics and solve for one block."""

    def observe(self, index: int, hidden_in: Tensor, hidden_out: Tensor) -> None:  # noqa: B027
        """One calibration batch through the finished block (tensors on the compute device)."""

    def after_block(self, index: int, block: nn.Module) -> dict[str, Any] | None:
        """The block is done: what the checkpoint must keep to resume after it (JSON-serialisable), or None."""
        return None

    def restore_block(self, index: int, block: nn.Module, state: dict[str, Any] | None) -> None:  # noqa: B027
        """A resumed run restored block ``index`` from the checkpoint: take back what ``after_block`` gave."""

    def finish(self, model: nn.Module) -> dict[str, Any] | None:
        """After the last block (or after restoring every block): apply whole-model changes, report."""
        return None


@dataclass
class BlockContext:
    """One block being swept, with the helpers steps use to calibrate and swap its layers."""

    model: nn.Module
    index: int
    prefix: str
    """The block's full module name (``model.layers.3``)."""
    block: nn.Module
    inputs: list[BlockInput]
    device: torch.device
    store: torch.device
    early_exit: bool
    true_sequential: bool
    calibrated: bool
    """Whether this sweep captured calibration inputs (so later forwards will run through the block)."""
    results: list[LayerRecord] = field(default_factory=list)
    """One record per layer per stage solved in this block, in solve order."""
    changed: list[str] = field(default_factory=list)
    """Full names of every module swapped in this block (what the checkpoint must be able to rebuild)."""
    held: list[nn.Module] = field(default_factory=list)

    def probe(self, names: list[str], *, with_readers: bool = False) -> BlockGroups:
        """Group ``names`` by shared input in call order, from one forward (``groups.execution_groups``)."""
        found = execution_groups(self.model, self.block, names, self.inputs[0], self.device,
                                 with_readers=self.prefix if with_readers else None)
        found.stop_early = found.stop_early and self.early_exit
        return found

    def collect(self, make_stats: MakeStats, group: list[str], *, stop_early: bool,
                shared_within: list[list[str]] | None = None) -> dict[str, Any]:
        return collect_stats(self.model, self.block, make_stats, group, self.inputs, self.device,
                             stop_early=stop_early, shared_within=shared_within)

    def record_of(self, name: str) -> LayerRecord | None:
        """Layer ``name`` as the stages before in this block left it (their records merged); None when none
        touched it. Layer-wise stages share one sweep, so every earlier stage of a layer is here."""
        return LayerRecords(r for r in self.results if r.name == name).get(name)

    def replace(self, name: str, replacement: nn.Module, *, original: Tensor, method: str, tag: str,
                facts: Mapping[str, Any] | None = None, record: bool = True) -> None:
        """Swap ``replacement`` in at ``name`` and (``record``) record it: the scheme and layout the module
        holds, the ``facts`` the pass states (``Pass.record_facts``), the error against the ``original``
        weight. A quantized replacement keeps a dequantized weight while this block is swept, so the
        forwards that follow do not unpack its codes again."""
        if record:
            self.results.append(layer_record(name, replacement, original=original, method=method, tag=tag,
                                             facts=facts or {}))
        swap_module(self.model, name, replacement)
        self.changed.append(name)
        if self.calibrated and hasattr(replacement, "hold_dense_weight"):
            replacement.hold_dense_weight(original.dtype)
            self.held.append(replacement)

    def outputs(self) -> list[Tensor]:
        """The block's outputs now, one per calibration batch, on the offload device."""
        return [block_output(self.block, item.to(self.device)).to(self.store) for item in self.inputs]

    def release(self) -> None:
        for module in self.held:
            module.drop_dense_weight()
        self.held.clear()


def sweep(model: nn.Module, block_path: str, steps: Sequence[Step], *, device: torch.device,
          input_ids: Tensor | None = None,
          offload: torch.device | None = None, prepare_block: Callable[[int], None] | None = None,
          progress: Progress | None = None, start_block: int = 0, start_hidden: list[Tensor] | None = None,
          on_block: BlockDone | None = None, early_exit: bool = True,
          true_sequential: bool = True) -> list[LayerRecord]:
    """Run ``steps`` on the blocks at ``block_path`` (``models.blocks.find_blocks``, found once on the
    uncompressed model), block by block, each step's hooks in stage order within a block; returns the records.

    ``prepare_block(i)`` is called right before block ``i`` is used (streaming loads read its weights then).
    Resuming (``compress.pipeline.engine``): blocks before ``start_block`` are already done and skipped;
    ``start_hidden`` are the inputs of block ``start_block``. ``on_block(i, block, ctx, next_hidden, states)`` runs
    after each block is done and before its progress is reported, so a checkpoint written there survives an
    interrupt raised by the progress callback.

    ``true_sequential``: each group of a block is calibrated on inputs produced by the already-compressed
    groups before it. Off (the default of recipes), every group's statistics come from one forward on the
    block's inputs, as llm-compressor and the GPTQ reference do.

    Cost per block, with ``B`` calibration batches (``forward_batch_size`` samples each): one probing
    forward, then per group ``B`` forwards that stop at the group (``early_exit``; off, each is a full
    block), then ``B`` full forwards to propagate.
    """
    blocks = model.get_submodule(block_path)
    calibrated = any(step.needs_calibration for step in steps)
    inputs: list[BlockInput] = []
    if calibrated:
        if input_ids is None:
            raise CompressError("this method needs calibration data")
        batch = 1 if any(s.one_sample_forwards for s in steps) else forward_batch_size(*input_ids.shape[:2])
        inputs = capture_block_inputs(model, blocks, input_ids, device=device, offload=offload, batch_size=batch,
                                      progress=progress)
        if start_hidden is not None:  # the masks and rotary arguments are recomputed; the hidden states restored
            inputs = [item.with_hidden(h) for item, h in zip(inputs, start_hidden, strict=True)]
    label = steps[0].label if len(steps) == 1 else Step.label
    observers = [step for step in steps if type(step).observe is not Step.observe]
    results: list[LayerRecord] = []
    total = len(blocks)
    store = offload or torch.device("cpu")
    for index, block in enumerate(blocks):
        if index < start_block:
            continue
        if prepare_block is not None:
            prepare_block(index)
        home = next((p.device for p in block.parameters()), torch.device("cpu"))
        block.to(device)
        ctx = BlockContext(model, index, f"{block_path}.{index}", block, inputs, device, store, early_exit,
                           true_sequential, calibrated)
        for step in steps:
            step.run_block(ctx)
        propagate = calibrated and index + 1 < total
        if calibrated and (propagate or any(s.observes_outputs for s in steps)):
            outputs = []
            for item in inputs:
                moved = item.to(device)
                hidden = block_output(block, moved)
                for step in observers:
                    step.observe(index, moved.hidden, hidden)
                outputs.append(item.with_hidden(hidden.to(store)))
            inputs = outputs
        ctx.release()
        block.to(home)
        results.extend(ctx.results)
        states = [step.after_block(index, block) for step in steps]
        if on_block is not None:
            on_block(index, block, ctx, [item.hidden for item in inputs] if propagate else None, states)
        if progress is not None:
            progress(label, index + 1, total)
    return results
