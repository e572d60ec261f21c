"""Uncalibrated structured pruning, for comparison only: what the calibrated scores must beat.

- channels / heads by weight magnitude: a channel's squared weight norm over the rows of its input
  projections and the column of its output projection; a head's over its q rows and o columns (the same
  number of query heads from every KV group, as the calibrated cut does);
- blocks: the last ones dropped (the naive depth cut ShortGPT compares against).

The same slicing, config editing and GQA handling as the real pass, so only the choice differs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress.models.blocks import find_blocks
from compress.models.load import load_model
from compress.models.structure import (
    drop_blocks,
    get_layer,
    head_counts,
    layout_of,
    set_heads,
    set_layer,
    set_mlp_width,
    sync_attention,
)
from compress.passes.prune.structured_math import (
    HeadCut,
    choose_heads,
    head_rows,
    keep_top,
    slice_cols,
    slice_rows,
)


def _channels(model, layout, ratio: float) -> None:
    _, blocks = find_blocks(model)
    width = get_layer(blocks[0], layout.mlp_out).in_features
    keep_count = width - max(1, round(ratio * width))
    for block in blocks:
        ins = [get_layer(block, n) for n in layout.mlp_in]
        down = get_layer(block, layout.mlp_out)
        scores = sum(lin.weight.detach().double().square().sum(1) for lin in ins)
        keep = keep_top(scores + down.weight.detach().double().square().sum(0), keep_count)
        for name, lin in zip(layout.mlp_in, ins, strict=True):
            set_layer(block, name, slice_rows(lin, keep))
        set_layer(block, layout.mlp_out, slice_cols(down, keep))
    set_mlp_width(model, layout, keep_count)


def _heads(model, layout, per_group: int) -> None:
    heads, kv, head_dim = head_counts(model.config)
    cut = HeadCut(per_group=per_group, groups=0)
    _, blocks = find_blocks(model)
    for block in blocks:
        q, k, v, o = (get_layer(block, n) for n in layout.attention)
        scores = (q.weight.detach().double().square().sum(1).reshape(heads, head_dim).sum(1)
                  + o.weight.detach().double().square().sum(0).reshape(heads, head_dim).sum(1))
        q_keep, kv_keep = choose_heads(scores, kv, cut)
        q_rows, kv_rows = head_rows(q_keep, head_dim), head_rows(kv_keep, head_dim)
        for name, new in zip(layout.attention, [slice_rows(q, q_rows), slice_rows(k, kv_rows),
                                                slice_rows(v, kv_rows), slice_cols(o, q_rows)], strict=True):
            set_layer(block, name, new)
        sync_attention(block, layout, heads - per_group * kv, kv, head_dim)
    set_heads(model, heads - per_group * kv, kv, head_dim)


def uncalibrated(source: str, target: str, out: Path, *, ratio: float = 0.25, per_group: int = 1,
                 num_blocks: int = 1) -> Path:
    """Prune ``source`` without data and save a plain checkpoint (with its tokenizer) to ``out``."""
    loaded = load_model(source)
    model = loaded.model
    layout = layout_of(model.config, target)
    with torch.inference_mode():
        if target == "channels":
            _channels(model, layout, ratio)
        elif target == "heads":
            _heads(model, layout, per_group)
        else:
            total = len(find_blocks(model)[1])
            drop_blocks(model, layout, list(range(total - num_blocks, total)))
    model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out
