"""Is the order of a recipe's stages possible? Decided from the config alone, before any weight is read.

Each layer-wise pass declares what it needs and what it leaves behind (``LayerPass.needs_dense_weights``,
``LayerPass.quantizes``). A layer is quantized once: a stage that rewrites float weights (pruning, another
quantizer) cannot follow a stage that left the same layer packed. The sensible compositions stay open:
prune then quantize (the quantizer keeps the zeros), structured stages first, and several quantizers on
disjoint layers (``ignore`` patterns splitting the model, i.e. hand-made mixed precision).
"""

from __future__ import annotations

from collections.abc import Sequence

from compress.core.errors import CompressError
from compress.passes.base import LayerPass


def check_stage_order(plan: Sequence[tuple[LayerPass, Sequence[str]]]) -> None:
    """Refuse, in one sentence, a stage that targets a layer an earlier stage already quantized."""
    quantized_by: dict[str, int] = {}
    for index, (layer_pass, names) in enumerate(plan):
        if layer_pass.needs_dense_weights:
            clash = [name for name in names if name in quantized_by]
            if clash:
                earlier = quantized_by[clash[0]]
                raise CompressError(
                    f"stage {index} ({layer_pass.config.method}) targets {clash[0]}"
                    f"{f' and {len(clash) - 1} more layers' if len(clash) > 1 else ''}, which stage {earlier} "
                    f"({plan[earlier][0].config.method}) already quantized; a layer is quantized once, so put "
                    "pruning before quantization, merge the quantize stages, or split the layers between "
                    "stages with ignore patterns")
        if layer_pass.quantizes():
            for name in names:
                quantized_by.setdefault(name, index)


def check_recipe_order(recipe, config, *, trust_remote_code: bool = False) -> None:
    """``check_stage_order`` for a Recipe, the layers of each stage taken from the model's config (a model
    built on the meta device, no weights). Structured stages change shapes, not kinds, and run first."""
    from compress.models.blocks import plan_layers
    from compress.passes import PASSES

    plan = []
    for stage in recipe.stages:
        layer_pass = PASSES.get(stage.method)(stage)
        if isinstance(layer_pass, LayerPass):
            layers = plan_layers(config, ignore=stage.ignore, trust_remote_code=trust_remote_code)
            plan.append((layer_pass, [name for name, _, _ in layers]))
    check_stage_order(plan)
