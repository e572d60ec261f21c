"""A transform stage (``method: rotate``) as a sweep step: the embedding and head before block 0, then each
block as the sweep reaches it, before the other stages of the same sweep solve that block.

Why inside the sweep and not on the whole model first: a streamed model (``models.load_model_streaming``)
holds only the block being swept, so each block is rotated right after it is read, and peak memory stays
one block. Before block 0, ``start`` folds the final norm into the head (untying it from the embedding
when they shared a weight) and rotates the embedding and the head, all outside the blocks and already
loaded; the calibration inputs captured after that are the rotated residual, which the rotated blocks
expect. ``--resume`` needs nothing more: ``start`` is deterministic (the seed) and runs again on the fresh
model, completed blocks come back rotated from the checkpoint, the others are rotated when reached.

Which modules read and write the residual is family knowledge (``compress.models.rotation``); the math is
the pass's (``compress.passes.rotate``). Every block linear gets a record (method ``rotate``, the kind as its
tag), so the manifest and the model card show the rotation.
"""

from __future__ import annotations

import logging

from torch import nn

from compress.core.errors import CompressError
from compress.models.rotation import RotationLayout, block_parts, residual_ends, rotation_layout, untie_head
from compress.passes.base import ResidualBlock, ResidualEnds, TransformPass
from compress.pipeline.sequential import BlockContext, Step

logger = logging.getLogger("compress")


def check_rotation(config, passes) -> None:
    """Refuse, from the config alone, a transform stage on a family it cannot rotate."""
    if any(isinstance(p, TransformPass) for p in passes):
        rotation_layout(config)


class RotateStep(Step):
    """``transform`` applied to every block at ``block_path`` and to the modules outside them."""

    label = "rotate blocks"
    needs_calibration = False

    def __init__(self, transform: TransformPass, block_path: str) -> None:
        self.transform = transform
        self.method = transform.config.method
        self.block_path = block_path
        self.layout: RotationLayout | None = None
        self.notes: list[str] = []
        """What was done beyond what was asked, one sentence each (``RunResult.notes``)."""

    def start(self, model: nn.Module) -> None:
        layout = rotation_layout(model.config)
        for block in model.get_submodule(self.block_path):  # every block checked before anything changes
            block_parts(block, layout)
        residual_ends(model, layout)
        if untie_head(model, layout):
            self.notes.append(f"rotate: {layout.head} shared the embedding's weight; folding the final norm into it "
                              "makes them differ, so it is stored on its own (config tie_word_embeddings: false)")
        embedding, norm, head = residual_ends(model, layout)
        hidden = embedding.weight.shape[1]
        built = getattr(self.transform, "constructions", lambda h, d: {})(hidden, layout.head_dim)
        for what, size in (("residual", hidden), ("heads", layout.head_dim)):
            if built.get(what) == "random-orthogonal":
                self.notes.append(f"rotate: no Hadamard matrix of order {size} is built here, so the {what} "
                                  "rotation is a seeded random orthogonal matrix (exact, but it spreads outliers "
                                  "less evenly)")
        logger.info("rotate: residual %s (%d), heads %s (%d)", built.get("residual"), hidden, built.get("heads"),
                    layout.head_dim)
        self.transform.transform_ends(ResidualEnds(embedding, norm, head))
        self.layout = layout

    def run_block(self, ctx: BlockContext) -> None:
        layout = self.layout
        if layout is None:
            raise CompressError("the rotate step ran a block before its start")
        parts = block_parts(ctx.block, layout)
        self.transform.transform_block(ResidualBlock(
            norms=[(parts[norm], [parts[r] for r in readers]) for norm, readers in layout.norms],
            writers=[parts[w] for w in layout.writers], value=parts[layout.value], output=parts[layout.output],
            heads=layout.heads, kv_heads=layout.kv_heads, head_dim=layout.head_dim))
        tag = self.transform.describe()
        for name, module in ctx.block.named_modules():
            if isinstance(module, nn.Linear):
                ctx.replace(f"{ctx.prefix}.{name}", module, original=module.weight.detach(), method=self.method,
                            tag=tag)


def rotation_kinds() -> tuple[str, ...]:
    """The ``kind`` values a ``rotate`` stage accepts (what ``--rotate`` takes)."""
    from typing import get_args

    from compress.passes import PASSES

    return get_args(PASSES.get("rotate").config_cls.model_fields["kind"].annotation)
