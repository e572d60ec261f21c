"""Structured pruning in memory: calibrate, score, slice, rewrite the config.

Channels and heads are pruned block by block like the layer-wise sweep: block 0's inputs are captured once,
each block's statistics are collected on its inputs, the block is pruned, and the pruned block produces the
next block's inputs, so every block is scored on what the smaller model will really feed it. Blocks are
scored on the original model in one sweep (ShortGPT computes all block influences at once) and then dropped.
Every layer loses the same count, so the config stays uniform.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress.calibrate.capture import BlockInput, block_output, capture_block_inputs
from compress.models.blocks import find_blocks
from compress.models.structure import (
    Layout,
    drop_blocks,
    get_layer,
    head_counts,
    head_refusal,
    layout_of,
    set_heads,
    set_layer,
    set_mlp_width,
    sync_attention,
)
from compress.passes.prune.structured import StructuredPrune
from compress.passes.prune.structured_math import BlockChange

Progress = Callable[[str, int, int], None]


def check_feasible(config, layer_pass: StructuredPrune) -> dict[str, Any]:
    """Raise the ``CompressError`` a stage would hit, from the config alone (before anything is loaded);
    otherwise say what the stage will remove: ``{target, asked, removed, of, summary}`` (per block for
    channels and heads: ``removed`` of ``of`` channels / query heads; blocks: of the model's blocks)."""
    target = layer_pass.config.target
    layout = layout_of(config, target)
    asked = layer_pass.config.num_blocks if layer_pass.config.num_blocks is not None else layer_pass.config.ratio
    extra: dict[str, Any] = {}
    if target == "channels":
        total = int(getattr(config, layout.intermediate_key, None) or 4 * int(config.hidden_size))
        removed = layer_pass.channels_removed(total)
        summary = layer_pass.summary(total, removed)
    elif target == "heads":
        total, kv, _ = head_counts(config)
        cut = layer_pass.head_cut(total, kv, head_refusal(config))
        removed = cut.removed_heads(total, kv)
        summary = layer_pass.summary(total, removed, num_kv=kv, cut=cut)
        extra = {"kv_heads": kv, "kv_heads_removed": cut.groups}
    else:
        total = int(getattr(config, layout.layers_key))
        removed = layer_pass.blocks_removed(total)
        summary = layer_pass.summary(total, removed)
    return {"target": target, "asked": asked, "removed": removed, "of": total, **extra, "summary": summary}


def prune_structured(model: nn.Module, passes: list[StructuredPrune], input_ids: torch.Tensor, *,
                     device: torch.device, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Apply each structured stage in order; returns one report entry per stage."""
    reports = []
    with torch.inference_mode():
        for layer_pass in passes:
            layout = layout_of(model.config, layer_pass.config.target)
            planned = check_feasible(model.config, layer_pass)  # on the config as the stages before left it
            if layer_pass.config.target == "blocks":
                done = _drop(model, layer_pass, layout, input_ids, device, progress)
                dropped = done["dropped"]
                planned["summary"] += f": block{'s' if len(dropped) > 1 else ''} {', '.join(map(str, dropped))}"
            else:
                done = _shrink(model, layer_pass, layout, input_ids, device, progress)
            reports.append({**done, "asked": planned["asked"], "summary": planned["summary"]})
    return reports


def _propagate(block: nn.Module, inputs: list[BlockInput], device: torch.device) -> list[BlockInput]:
    store = inputs[0].hidden.device if inputs else torch.device("cpu")
    return [item.with_hidden(block_output(block, item.to(device)).to(store)) for item in inputs]


def _collect(block: nn.Module, watched: nn.Linear, stats, inputs: list[BlockInput], device: torch.device) -> None:
    handle = watched.register_forward_hook(lambda module, args, output: stats.add_batch(args[0]))
    try:
        for item in inputs:
            block_output(block, item.to(device))
    finally:
        handle.remove()


def _shrink(model: nn.Module, layer_pass: StructuredPrune, layout: Layout, input_ids: torch.Tensor,
            device: torch.device, progress: Progress | None) -> dict[str, Any]:
    """Remove MLP channels or attention heads, the same count in every block, chosen per block."""
    target = layer_pass.config.target
    _, blocks = find_blocks(model)
    if target == "channels":
        width = get_layer(blocks[0], layout.mlp_out).in_features
        removed = layer_pass.channels_removed(width)
    else:
        heads, kv, head_dim = head_counts(model.config)
        cut = layer_pass.head_cut(heads, kv, head_refusal(model.config))
        new_heads = heads - cut.removed_heads(heads, kv)
        new_kv = kv - cut.groups
    inputs = capture_block_inputs(model, blocks, input_ids, device=device, progress=progress)
    per_block: list[dict[str, Any]] = []
    for index, block in enumerate(blocks):
        home = next((p.device for p in block.parameters()), torch.device("cpu"))
        block.to(device)
        if target == "channels":
            down = get_layer(block, layout.mlp_out)
            stats = layer_pass.channel_stats(down)
            _collect(block, down, stats, inputs, device)
            ins, out, keep = layer_pass.prune_mlp([get_layer(block, n) for n in layout.mlp_in], down, stats, removed)
            for name, module in zip(layout.mlp_in, ins, strict=True):
                set_layer(block, name, module)
            set_layer(block, layout.mlp_out, out)
            per_block.append({"block": index, "channels_kept": len(keep)})
        else:
            assert layout.attention is not None
            q, k, v, o = (get_layer(block, n) for n in layout.attention)
            stats = layer_pass.head_stats(o, head_dim)
            _collect(block, o, stats, inputs, device)
            layers, q_keep, kv_keep = layer_pass.prune_attention(q, k, v, o, head_dim=head_dim, num_kv=kv, cut=cut,
                                                                 stats=stats)
            for name, module in zip(layout.attention, layers, strict=True):
                set_layer(block, name, module)
            sync_attention(block, layout, new_heads, new_kv, head_dim)
            per_block.append({"block": index, "heads_kept": q_keep, "kv_heads_kept": kv_keep})
        stats.free()
        if index + 1 < len(blocks):
            inputs = _propagate(block, inputs, device)
        block.to(home)
        if progress is not None:
            progress(f"prune {target}", index + 1, len(blocks))
    if target == "channels":
        set_mlp_width(model, layout, width - removed)
        return {"target": target, "intermediate_size": [width, width - removed], "blocks": per_block}
    set_heads(model, new_heads, new_kv, head_dim)
    how = (f"{cut.per_group} query head(s) from each of the {kv} KV groups" if cut.per_group
           else f"{cut.groups} whole KV group(s) with their query heads")
    return {"target": target, "num_attention_heads": [heads, new_heads], "num_key_value_heads": [kv, new_kv],
            "head_dim": head_dim, "removed": how, "blocks": per_block}


def _drop(model: nn.Module, layer_pass: StructuredPrune, layout: Layout, input_ids: torch.Tensor,
          device: torch.device, progress: Progress | None) -> dict[str, Any]:
    """Score every block by how much it changes its input (1 − cosine), then drop the lowest."""
    _, blocks = find_blocks(model)
    removed = layer_pass.blocks_removed(len(blocks))
    inputs = capture_block_inputs(model, blocks, input_ids, device=device, progress=progress)
    scores: list[float] = []
    for index, block in enumerate(blocks):
        home = next((p.device for p in block.parameters()), torch.device("cpu"))
        block.to(device)
        change = BlockChange()
        outputs = []
        for item in inputs:
            moved = item.to(device)
            hidden = block_output(block, moved)
            change.add(moved.hidden, hidden)
            outputs.append(item.with_hidden(hidden.to(item.hidden.device)))
        inputs = outputs
        scores.append(change.score())
        block.to(home)
        if progress is not None:
            progress("score blocks", index + 1, len(blocks))
    drop = layer_pass.blocks_to_drop(scores, removed)
    drop_blocks(model, layout, drop)
    return {"target": "blocks", "num_hidden_layers": [len(scores), len(scores) - removed], "dropped": drop,
            "scores": scores}
