"""Structured pruning as sweep steps: channels and heads per block, blocks scored in one sweep then dropped.

Channels and heads are pruned block by block: each block's statistics (the input of its MLP's output
projection, or of its attention output projection) are collected on its inputs, the block is sliced, and the
sliced block produces the next block's inputs, so every block is scored on what the smaller model will
really feed it. Blocks are scored on the original model in one sweep (ShortGPT computes all block
influences at once: ``observe`` sees each block's input and output) and dropped in ``finish``. Every layer
loses the same count, so the config stays uniform; ``finish`` writes the new widths to it.

A shape-changing step runs in a sweep of its own (``Step.alone``), with one sample per forward, as it
always did, so its outputs are byte-identical to those of the former separate structured path.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from compress.core.errors import CompressError
from compress.models.blocks import find_blocks, plan_layers
from compress.models.structure import (
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
from compress.pipeline.sequential import BlockContext, Step


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


def check_structured(recipe, config, passes: list) -> list[dict[str, Any]]:
    """Every refusal the config alone can decide for the structured stages of ``recipe`` (their order is
    ``stage_order``'s), and what each will remove (``check_feasible``, for ``--dry-run`` and the report)."""
    whole = [p for p in passes if isinstance(p, StructuredPrune)]
    if not whole:
        return []
    if recipe.export.format == "gptq":
        raise CompressError("structured pruning exports a plain or compressed-tensors checkpoint; "
                            "the GPTQ layout is not supported with it")
    every = {name for name, _, _ in plan_layers(config, ignore=(), trust_remote_code=recipe.trust_remote_code)}
    planned = []
    for layer_pass in whole:
        planned.append(check_feasible(config, layer_pass))
        kept = {name for name, _, _ in plan_layers(config, ignore=layer_pass.config.ignore,
                                                   trust_remote_code=recipe.trust_remote_code)}
        if kept != every:
            raise CompressError("structured pruning changes every block alike (the config stays uniform), "
                                "so its ignore patterns cannot exempt layers inside the blocks")
    return planned


def structured_step(layer_pass: StructuredPrune) -> Step:
    return ScoreBlocks(layer_pass) if layer_pass.config.target == "blocks" else Shrink(layer_pass)


class _Structured(Step):
    alone = True
    one_sample_forwards = True

    def __init__(self, layer_pass: StructuredPrune) -> None:
        self.layer_pass = layer_pass
        self.method = layer_pass.config.method
        self.target = layer_pass.config.target
        if self.target != "blocks":
            self.label = f"prune {self.target}"

    def start(self, model: nn.Module) -> None:
        self.layout = layout_of(model.config, self.target)
        self.planned = check_feasible(model.config, self.layer_pass)  # on the config as the stages before left it
        self.blocks = len(find_blocks(model)[1])


class Shrink(_Structured):
    """Remove MLP channels or attention heads, the same count in every block, chosen per block."""

    def start(self, model: nn.Module) -> None:
        super().start(model)
        _, blocks = find_blocks(model)
        self.kept: dict[int, dict[str, Any]] = {}
        if self.target == "channels":
            self.width = get_layer(blocks[0], self.layout.mlp_out).in_features
            self.removed = self.layer_pass.channels_removed(self.width)
        else:
            self.heads, self.kv, self.head_dim = head_counts(model.config)
            self.cut = self.layer_pass.head_cut(self.heads, self.kv, head_refusal(model.config))
            self.new_heads = self.heads - self.cut.removed_heads(self.heads, self.kv)
            self.new_kv = self.kv - self.cut.groups

    def run_block(self, ctx: BlockContext) -> None:
        layout, block, prune = self.layout, ctx.block, self.layer_pass
        if self.target == "channels":
            watched, make = layout.mlp_out, lambda name, linear: prune.channel_stats(linear)
        else:
            assert layout.attention is not None
            watched, make = layout.attention[3], lambda name, linear: prune.head_stats(linear, self.head_dim)
        name = f"{ctx.prefix}.{watched}"
        stats = ctx.collect(make, [name], stop_early=ctx.probe([name]).stop_early)[name]
        if self.target == "channels":
            ins, out, keep = prune.prune_mlp([get_layer(block, n) for n in layout.mlp_in],
                                             get_layer(block, layout.mlp_out), stats, self.removed)
            names, layers = (*layout.mlp_in, layout.mlp_out), (*ins, out)
            self.kept[ctx.index] = {"block": ctx.index, "channels_kept": len(keep)}
        else:
            assert layout.attention is not None
            q, k, v, o = (get_layer(block, n) for n in layout.attention)
            layers, q_keep, kv_keep = prune.prune_attention(q, k, v, o, head_dim=self.head_dim, num_kv=self.kv,
                                                            cut=self.cut, stats=stats)
            names = layout.attention
            self.kept[ctx.index] = {"block": ctx.index, "heads_kept": q_keep, "kv_heads_kept": kv_keep}
        for relative, module in zip(names, layers, strict=True):
            set_layer(block, relative, module)
            ctx.changed.append(f"{ctx.prefix}.{relative}")
        if self.target == "heads":
            sync_attention(block, layout, self.new_heads, self.new_kv, self.head_dim)
        stats.free()

    def after_block(self, index: int, block: nn.Module) -> dict[str, Any]:
        return self.kept[index]

    def restore_block(self, index: int, block: nn.Module, state: dict[str, Any] | None) -> None:
        if state is None:
            raise CompressError("the resume state of a structured stage lost what a block kept; delete the "
                                "partial folder to start over")
        self.kept[index] = state
        if self.target == "heads":  # attributes the attention module cached from the config at construction
            sync_attention(block, self.layout, self.new_heads, self.new_kv, self.head_dim)

    def finish(self, model: nn.Module) -> dict[str, Any]:
        per_block = [self.kept[i] for i in range(self.blocks)]
        common = {"asked": self.planned["asked"], "summary": self.planned["summary"], "blocks": per_block}
        if self.target == "channels":
            set_mlp_width(model, self.layout, self.width - self.removed)
            return {"target": "channels", "intermediate_size": [self.width, self.width - self.removed], **common}
        set_heads(model, self.new_heads, self.new_kv, self.head_dim)
        how = (f"{self.cut.per_group} query head(s) from each of the {self.kv} KV groups" if self.cut.per_group
               else f"{self.cut.groups} whole KV group(s) with their query heads")
        return {"target": "heads", "num_attention_heads": [self.heads, self.new_heads],
                "num_key_value_heads": [self.kv, self.new_kv], "head_dim": self.head_dim, "removed": how, **common}


class ScoreBlocks(_Structured):
    """Score every block by how much it changes its input (1 − cosine), then drop the lowest."""

    label = "score blocks"
    observes_outputs = True

    def start(self, model: nn.Module) -> None:
        super().start(model)
        self.removed = self.layer_pass.blocks_removed(self.blocks)
        self.changes: dict[int, BlockChange] = {}
        self.scores: dict[int, float] = {}

    def run_block(self, ctx: BlockContext) -> None:
        self.changes[ctx.index] = BlockChange()

    def observe(self, index: int, hidden_in: Tensor, hidden_out: Tensor) -> None:
        self.changes[index].add(hidden_in, hidden_out)

    def after_block(self, index: int, block: nn.Module) -> dict[str, Any]:
        self.scores[index] = self.changes.pop(index).score()
        return {"score": self.scores[index]}

    def restore_block(self, index: int, block: nn.Module, state: dict[str, Any] | None) -> None:
        if state is None or "score" not in state:
            raise CompressError("the resume state of a block-dropping stage lost a block's score; delete the "
                                "partial folder to start over")
        self.scores[index] = float(state["score"])

    def finish(self, model: nn.Module) -> dict[str, Any]:
        scores = [self.scores[i] for i in range(self.blocks)]
        drop = self.layer_pass.blocks_to_drop(scores, self.removed)
        drop_blocks(model, self.layout, drop)
        summary = self.planned["summary"] + f": block{'s' if len(drop) > 1 else ''} {', '.join(map(str, drop))}"
        return {"target": "blocks", "num_hidden_layers": [len(scores), len(scores) - self.removed], "dropped": drop,
                "scores": scores, "asked": self.planned["asked"], "summary": summary}
