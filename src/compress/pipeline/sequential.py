"""The block sweep: the one loop every layer-wise method runs in.

For each block, in order: move it to the compute device; for each pass, calibrate and compress its layers
group by group in execution order ("true sequential": q/k/v, then o_proj, then gate/up, then down), each
group's statistics collected on inputs produced by the already-compressed layers before it; then run the
block once more to produce the next block's inputs, so every block is calibrated on what the compressed
model will really feed it. Only the current block is on the device; captured activations live on the
offload device (the CPU by default). Data-free passes (RTN) skip the forward passes entirely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compress.calibrate.capture import BlockInput, block_output, capture_block_inputs, forward_batch_size
from compress.core.errors import CompressError
from compress.passes.base import LayerPass

Progress = Callable[[str, int, int], None]
BlockDone = Callable[[int, nn.Module, list["LayerResult"], "list[torch.Tensor] | None"], None]


@dataclass
class LayerResult:
    """What a pass did to one layer, for the report."""

    name: str
    method: str
    scheme: str
    in_features: int
    out_features: int
    rel_weight_error: float | None


def swap_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def _relative_error(original: torch.Tensor, module: nn.Module) -> float | None:
    dequantized = getattr(module, "dequantized_weight", None)
    if dequantized is None:
        return None
    reference = original.float()
    denom = reference.norm().item()
    return (dequantized(torch.float32).to(reference.device) - reference).norm().item() / max(denom, 1e-12)


def check_layers(model: nn.Module, plan: Sequence[tuple[LayerPass, list[str]]]) -> None:
    """Every targeted layer accepts its pass, in an order that can work; fails before any work is done."""
    from compress.pipeline.stage_order import check_stage_order

    check_stage_order(plan)
    for layer_pass, names in plan:
        if not names:
            raise CompressError(f"method {layer_pass.config.method} matched no linear layer (check --ignore)")
        for name in names:
            layer_pass.check_layer(name, model.get_submodule(name))


def _by_block(names: list[str], block_path: str) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = {}
    prefix = f"{block_path}."
    for name in names:
        if not name.startswith(prefix):
            raise CompressError(f"layer {name} is outside the blocks at {block_path}")
        grouped.setdefault(int(name[len(prefix):].split(".", 1)[0]), []).append(name)
    return grouped


@dataclass
class BlockGroups:
    """The targeted layers of one block grouped by shared input, in call order, and whether a group's
    statistics may be collected by a forward that stops as soon as the group's last layer is reached."""

    groups: list[list[str]]
    stop_early: bool
    """True when every layer was called exactly once in the probing forward: then nothing after the
    group's layers can influence their inputs, so the rest of the block need not run."""


def execution_groups(model: nn.Module, block: nn.Module, names: list[str], sample: BlockInput,
                     device: torch.device) -> BlockGroups:
    """``names`` grouped by shared input, in the order the block calls them.

    Layers fed the same tensor (q/k/v; gate/up) form one group, calibrated together; a later group sees
    the outputs of earlier, already-compressed groups. Learned from one forward pass, so no per-family table.
    """
    order: list[str] = []
    seen_input: dict[str, torch.Tensor] = {}  # holds every input alive, so no two can share an address
    calls: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(module, inputs, output, name=name):
            calls[name] = calls.get(name, 0) + 1
            if name not in seen_input:
                seen_input[name] = inputs[0]
                order.append(name)
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        block_output(block, sample.to(device))
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in order:
        x = seen_input[name]
        previous = seen_input[groups[-1][0]] if groups else None
        same = previous is not None and (x is previous or (
            x.data_ptr() == previous.data_ptr() and x.shape == previous.shape and x.stride() == previous.stride()))
        if same:
            groups[-1].append(name)
        else:
            groups.append([name])
    missing = [n for n in names if n not in seen_input]
    if missing:  # never called during the forward (e.g. an unused branch): compress it last on no data
        groups.append(missing)
    return BlockGroups(groups, stop_early=not missing and all(count == 1 for count in calls.values()))


class _GroupSeen(Exception):
    """Raised once every layer of the group being calibrated has received its input."""


def _calibrate_group(model: nn.Module, block: nn.Module, layer_pass: LayerPass, group: list[str],
                     inputs: list[BlockInput], device: torch.device, *, stop_early: bool,
                     shared_within: list[list[str]] | None = None) -> dict[str, object]:
    """Feed each layer's calibration inputs to its statistics, one forward per calibration batch.

    With ``stop_early`` the forward ends at the group's last layer (before it computes), so the q/k/v
    group costs a norm rather than a whole block, and only the last group runs (almost) all of it.
    ``shared_within``: the sets of layers known to read one tensor (default: the whole ``group``)."""
    stats = {name: layer_pass.make_stats(name, model.get_submodule(name)) for name in group}
    # layers of a group read the same tensor, so one accumulator per kind of statistic serves them all
    # (q/k/v share one Hessian, gate/up another): the same numbers for a fraction of the products
    for members in shared_within if shared_within is not None else [group]:
        owners: dict[object, object] = {}
        for name in members:
            stat = stats[name]
            key = stat.share_key() if hasattr(stat, "share_key") else None
            if key is None:
                continue
            if key in owners:
                stats[name] = owners[key]
            else:
                owners[key] = stat
    pending: set[str] = set()
    handles = []
    fed: set[int] = set()
    for name, stat in stats.items():
        if stat is not None and id(stat) in fed:
            stat = None  # an alias: its owner is fed from the same input
        elif stat is not None:
            fed.add(id(stat))

        def hook(module, args, stat=stat, name=name):
            if stat is not None:
                stat.add_batch(args[0].detach())
            if stop_early:
                pending.discard(name)
                if not pending:
                    raise _GroupSeen

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for item in inputs:
            pending.update(group)
            try:
                block_output(block, item.to(device))
            except _GroupSeen:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return stats


def run_layerwise(model: nn.Module, block_path: str, blocks: nn.ModuleList,
                  plan: Sequence[tuple[LayerPass, list[str]]], *, device: torch.device,
                  input_ids: torch.Tensor | None = None, offload: torch.device | None = None,
                  prepare_block: Callable[[int], None] | None = None,
                  progress: Progress | None = None, start_block: int = 0,
                  start_hidden: list[torch.Tensor] | None = None,
                  on_block: BlockDone | None = None, early_exit: bool = True,
                  true_sequential: bool = True) -> list[LayerResult]:
    """Apply each pass to its layers, block by block, swapping in the modules the passes return.

    ``prepare_block(i)`` is called right before block ``i`` is used (streaming loads read its weights then).
    Resuming (``compress.pipeline.resume``): blocks before ``start_block`` are already compressed and are
    skipped; ``start_hidden`` are the inputs of block ``start_block``. ``on_block(i, block, results,
    next_hidden)`` runs after each block is done and before its progress is reported, so a checkpoint
    written there survives an interrupt raised by the progress callback.

    ``true_sequential`` (default): each group is calibrated on inputs produced by the already-compressed
    groups before it. Off, every group's statistics come from one forward on the block's inputs, as
    llm-compressor and the GPTQ reference do: two forwards per batch instead of one per group plus one.

    Cost per block, with ``B`` calibration batches (``forward_batch_size`` samples each): one probing
    forward, then per group ``B`` forwards that stop at the group (``early_exit``; off, each is a full
    block), then ``B`` full forwards to propagate. Quantized layers keep a dequantized weight while their
    block is being swept, so the later forwards do not unpack codes again.
    """
    calibrated = any(p.needs_calibration for p, _ in plan)
    inputs: list[BlockInput] = []
    if calibrated:
        if input_ids is None:
            raise CompressError("this method needs calibration data")
        batch = forward_batch_size(input_ids.shape[0], input_ids.shape[1])
        inputs = capture_block_inputs(model, blocks, input_ids, device=device, offload=offload, batch_size=batch,
                                      progress=progress)
        if start_hidden is not None:  # the masks and rotary arguments are recomputed; the hidden states restored
            inputs = [item.with_hidden(h) for item, h in zip(inputs, start_hidden, strict=True)]
    per_pass = [(p, _by_block(names, block_path)) for p, names in plan]
    results: list[LayerResult] = []
    held: list[nn.Module] = []  # quantized layers of the current block keeping a dequantized weight
    total = len(blocks)
    store = offload or torch.device("cpu")
    for index, block in enumerate(blocks):
        if index < start_block:
            continue
        done_before = len(results)
        if prepare_block is not None:
            prepare_block(index)
        home = next((p.device for p in block.parameters()), torch.device("cpu"))
        block.to(device)
        for layer_pass, by_block in per_pass:
            names = by_block.get(index, [])
            if not names:
                continue
            if layer_pass.needs_calibration:
                found = execution_groups(model, block, names, inputs[0], device)
                groups, stop_early = found.groups, found.stop_early and early_exit
            else:
                groups, stop_early = [names], False
            if layer_pass.needs_calibration and not true_sequential and len(groups) > 1:
                # every group's statistics from one forward on the block's (uncompressed) inputs
                everything = [name for group in groups for name in group]
                one = _calibrate_group(model, block, layer_pass, everything, inputs, device, stop_early=stop_early,
                                       shared_within=groups)
                precomputed = [{name: one[name] for name in group} for group in groups]
            else:
                precomputed = None
            for number, group in enumerate(groups):
                if precomputed is not None:
                    stats = precomputed[number]
                elif layer_pass.needs_calibration:
                    stats = _calibrate_group(model, block, layer_pass, group, inputs, device, stop_early=stop_early)
                else:
                    stats = {}
                for name in group:
                    linear = model.get_submodule(name)
                    original = linear.weight.detach()
                    replacement = layer_pass.apply(name, linear, stats.get(name))
                    results.append(LayerResult(
                        name=name, method=layer_pass.config.method, scheme=layer_pass.describe(),
                        in_features=linear.in_features, out_features=linear.out_features,
                        rel_weight_error=_relative_error(original, replacement),
                    ))
                    swap_module(model, name, replacement)
                    if calibrated and hasattr(replacement, "hold_dense_weight"):
                        replacement.hold_dense_weight(original.dtype)
                        held.append(replacement)
                for stat in {id(s): s for s in stats.values() if s is not None}.values():
                    if hasattr(stat, "free"):  # after the whole group: members may share one accumulator
                        stat.free()
        if calibrated and index + 1 < total:
            inputs = [item.with_hidden(block_output(block, item.to(device)).to(store)) for item in inputs]
        for module in held:
            module.drop_dense_weight()
        held.clear()
        block.to(home)
        if on_block is not None:
            propagated = calibrated and index + 1 < total
            on_block(index, block, results[done_before:], [item.hidden for item in inputs] if propagated else None)
        if progress is not None:
            progress("compress blocks", index + 1, total)
    return results
