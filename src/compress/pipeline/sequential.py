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

from compress.calibrate.capture import BlockInput, block_output, capture_block_inputs
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
    """Every targeted layer accepts its pass; fails before any work is done."""
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


def execution_groups(model: nn.Module, block: nn.Module, names: list[str], sample: BlockInput,
                     device: torch.device) -> list[list[str]]:
    """``names`` grouped by shared input, in the order the block calls them.

    Layers fed the same tensor (q/k/v; gate/up) form one group, calibrated together; a later group sees
    the outputs of earlier, already-compressed groups. Learned from one forward pass, so no per-family table.
    """
    order: list[str] = []
    seen_input: dict[str, torch.Tensor] = {}  # holds every input alive, so no two can share an address
    handles = []
    for name in names:
        def hook(module, inputs, output, name=name):
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
    return groups


def _calibrate_group(model: nn.Module, block: nn.Module, layer_pass: LayerPass, group: list[str],
                     inputs: list[BlockInput], device: torch.device) -> dict[str, object]:
    stats = {name: layer_pass.make_stats(name, model.get_submodule(name)) for name in group}
    handles = []
    for name, stat in stats.items():
        if stat is None:
            continue

        def hook(module, args, output, stat=stat):
            stat.add_batch(args[0].detach())

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        for item in inputs:
            block_output(block, item.to(device))
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
                  on_block: BlockDone | None = None) -> list[LayerResult]:
    """Apply each pass to its layers, block by block, swapping in the modules the passes return.

    ``prepare_block(i)`` is called right before block ``i`` is used (streaming loads read its weights then).
    Resuming (``compress.pipeline.resume``): blocks before ``start_block`` are already compressed and are
    skipped; ``start_hidden`` are the inputs of block ``start_block``. ``on_block(i, block, results,
    next_hidden)`` runs after each block is done and before its progress is reported, so a checkpoint
    written there survives an interrupt raised by the progress callback.
    """
    calibrated = any(p.needs_calibration for p, _ in plan)
    inputs: list[BlockInput] = []
    if calibrated:
        if input_ids is None:
            raise CompressError("this method needs calibration data")
        inputs = capture_block_inputs(model, blocks, input_ids, device=device, offload=offload, progress=progress)
        if start_hidden is not None:  # the masks and rotary arguments are recomputed; the hidden states restored
            inputs = [item.with_hidden(h) for item, h in zip(inputs, start_hidden, strict=True)]
    per_pass = [(p, _by_block(names, block_path)) for p, names in plan]
    results: list[LayerResult] = []
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
                groups = execution_groups(model, block, names, inputs[0], device)
            else:
                groups = [names]
            for group in groups:
                stats = (_calibrate_group(model, block, layer_pass, group, inputs, device)
                         if layer_pass.needs_calibration else {})
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
                    stat = stats.get(name)
                    if stat is not None and hasattr(stat, "free"):
                        stat.free()
        if calibrated and index + 1 < total:
            inputs = [item.with_hidden(block_output(block, item.to(device)).to(store)) for item in inputs]
        block.to(home)
        if on_block is not None:
            propagated = calibrated and index + 1 < total
            on_block(index, block, results[done_before:], [item.hidden for item in inputs] if propagated else None)
        if progress is not None:
            progress("compress blocks", index + 1, total)
    return results
