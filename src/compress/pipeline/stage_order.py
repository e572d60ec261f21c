"""Is the order of a recipe's stages possible? Decided from the config alone, before any weight is read.

Each pass declares what it needs and what it leaves behind (``Pass.needs_dense_weights``, ``quantizes``,
``changes_shapes``, ``rewrites_producers``). A layer is quantized once: a stage that rewrites float weights
(pruning, another quantizer, a group pass folding scales into the producers of its layers) cannot follow a
stage that left the same layer packed. A shape-changing stage (structured pruning) slices dense layers and
rewrites the config, and the stages after it are planned on the smaller model, so it comes before every
layer-wise stage. A transform (``rotate``) rewrites every linear of the model in a new basis, so it comes
before every stage that quantizes or prunes (after them it would quantize nothing and destroy their zeros);
a structured stage may precede it. A KV-cache stage calibrates on what every stage before it made, so it
comes last. The sensible compositions stay open: structured then prune then quantize,
rotate then awq then gptq, and several quantizers on disjoint layers (``ignore`` patterns splitting the model,
i.e. hand-made mixed precision).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from compress.core.errors import CompressError
from compress.passes.base import Pass


def check_stage_order(plan: Sequence[tuple[Pass, Sequence[str]]], producers: Mapping[str, str] | None = None) -> None:
    """Refuse, in one sentence, a structured stage after a layer-wise one, or a stage that rewrites a layer
    an earlier stage already quantized. ``producers``: reader → the linear producing its input, for the
    stages that rewrite producers (``compress.models.producers.linear_producers``)."""
    first_layerwise: int | None = None
    first_compressing: int | None = None
    quantized_by: dict[str, int] = {}
    cache_stage: int | None = None
    for index, (layer_pass, names) in enumerate(plan):
        method = layer_pass.config.method
        if cache_stage is not None:
            raise CompressError(f"stage {cache_stage} ({plan[cache_stage][0].config.method}) calibrates the KV cache "
                                f"on the model every stage before it made, so it must be the last stage, but stage "
                                f"{index} ({method}) follows it; put it last")
        if layer_pass.scope == "cache":
            cache_stage = index
            continue
        if layer_pass.scope == "transform":
            if first_compressing is not None:
                before = plan[first_compressing][0].config.method
                raise CompressError(
                    f"stage {index} ({method}) rotates every linear layer, so it must come before the stages that "
                    f"quantize or prune them, but stage {first_compressing} ({before}) comes first; put {method} "
                    "before it")
        elif not layer_pass.changes_shapes and first_compressing is None:
            first_compressing = index
        if layer_pass.changes_shapes:
            if first_layerwise is not None:
                raise CompressError(
                    f"stage {index} ({method}) changes the model's shape after stage {first_layerwise} "
                    f"({plan[first_layerwise][0].config.method}); structured stages must come before layer-wise "
                    "stages (prune the shape first, then quantize or sparsify the smaller model)")
            continue
        first_layerwise = index if first_layerwise is None else first_layerwise
        touched = list(names)
        if layer_pass.rewrites_producers and producers:
            touched += [producers[name] for name in names if name in producers]
        if layer_pass.needs_dense_weights:
            clash = [name for name in dict.fromkeys(touched) if name in quantized_by]
            if clash:
                earlier = quantized_by[clash[0]]
                before = plan[earlier][0].config.method
                advice = (f"put {method} before {before}" if layer_pass.rewrites_producers  # a scaling stage
                          else "put pruning before quantization, merge the quantize stages, or split the layers "
                               "between stages with ignore patterns")
                raise CompressError(
                    f"stage {index} ({method}) rewrites {clash[0]}"
                    f"{f' and {len(clash) - 1} more layers' if len(clash) > 1 else ''}, which stage {earlier} "
                    f"({before}) already quantized; a layer is quantized once, so {advice}")
        if layer_pass.quantizes():
            for name in names:
                quantized_by.setdefault(name, index)


def check_recipe_order(recipe, config, *, trust_remote_code: bool = False) -> None:
    """``check_stage_order`` for a Recipe, the layers of each stage taken from the model's config (a model
    built on the meta device, no weights)."""
    from compress.models.blocks import plan_layers
    from compress.passes import PASSES

    passes = [PASSES.get(stage.method)(stage) for stage in recipe.stages]
    plan: list[tuple[Pass, Sequence[str]]] = []
    for layer_pass in passes:
        names: Sequence[str] = ()
        if not layer_pass.changes_shapes and layer_pass.scope != "cache":
            layers = plan_layers(config, ignore=layer_pass.config.ignore, trust_remote_code=trust_remote_code)
            names = [name for name, _, _ in layers]
        plan.append((layer_pass, names))
    producers = None
    if any(p.rewrites_producers for p in passes):
        producers = _linear_producers(config, trust_remote_code)
    check_stage_order(plan, producers)


def _linear_producers(config, trust_remote_code: bool) -> dict[str, str]:
    import torch

    from compress.models.blocks import convert_conv1d_to_linear, find_blocks
    from compress.models.load import instantiate_from_config
    from compress.models.producers import linear_producers

    with torch.device("meta"):
        model = instantiate_from_config(config, trust_remote_code=trust_remote_code)
    convert_conv1d_to_linear(model)
    block_path, blocks = find_blocks(model)
    return linear_producers(config, model, block_path, blocks)
