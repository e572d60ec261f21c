"""``--lowrank-compensate R`` (alias ``--lorc-rank R``): wrap the recipe's quantizer stages in ``lowrank`` stages
(EoRA compensation).

The stage flags (``--bits``, ``--method``, ...) address every stage (``stages.*``), and a ``lowrank`` stage
takes its quantizer's fields inside ``quantizer:``. So the flags are applied and validated first, exactly as
without the option (a bad ``--bits`` is still named by its flag), and the validated stages are then wrapped
and handed back as one ``stages=`` override of the base recipe, with the stage flags spent. Stages that do
not quantize (a rotation) are kept as they are, in place, so ``--rotate`` (whose override comes first) and a
rotated base recipe are compensated too.
"""

from __future__ import annotations

import json
from typing import Any

from compress.core.errors import CompressError


def compensation_rank(lowrank_compensate: int | None, lorc_rank: int | None) -> int | None:
    """The one rank of ``--lowrank-compensate`` and ``--lorc-rank`` (ZeroQuant-V2's name, LoRC, for low-rank
    compensation of the quantization error: the same machinery, so it is an alias, not a second method).
    Refuses, in one sentence naming the flag, a rank below 1 or the two flags disagreeing."""
    if lorc_rank is None:
        return lowrank_compensate
    if lorc_rank <= 0:
        raise CompressError(f"--lorc-rank must be a positive rank, got {lorc_rank}")
    if lowrank_compensate is not None and lowrank_compensate != lorc_rank:
        raise CompressError(f"--lorc-rank {lorc_rank} and --lowrank-compensate {lowrank_compensate} name the same "
                            "low-rank compensation with different ranks; give one of them")
    return lorc_rank


def lowrank_arguments(base: str, flags: dict[str, Any], rank: int | None,
                      overrides: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """``(flags, overrides)`` for ``execute_recipe(base, flags, overrides=...)`` with every layer-wise
    quantizer stage of the recipe wrapped in ``{method: lowrank, rank: R, quantizer: ...}``; unchanged when
    ``rank`` is None. Refuses, in one sentence, a rank below 1 or a recipe with nothing to compensate."""
    overrides = list(overrides or [])
    if rank is None:
        return flags, overrides
    if rank <= 0:
        raise CompressError(f"--lowrank-compensate must be a positive rank, got {rank}")
    from compress.passes import PASSES
    from compress.passes.base import LayerPass
    from compress.passes.quantize.lowrank import METHOD
    from compress.recipes.flags import recipe_from_flags
    from compress.recipes.loader import apply_overrides, load_recipe_data

    recipe = recipe_from_flags(apply_overrides(load_recipe_data(base), overrides), flags)  # flag errors name the flag
    stages, wrapped = [], 0
    for stage in recipe.stages:
        data = stage.model_dump(mode="json")
        layer_pass = PASSES.get(stage.method)(stage)
        if stage.method == METHOD:
            raise CompressError("the recipe already has a lowrank stage; drop --lowrank-compensate or that stage")
        if layer_pass.quantizes() and not isinstance(layer_pass, LayerPass):
            raise CompressError(f"--lowrank-compensate wraps layer-wise quantizers (rtn, gptq, ...), but method "
                                f"{stage.method} solves {layer_pass.scope}s of layers together")
        if layer_pass.quantizes():
            data = {"method": METHOD, "rank": rank, "quantizer": data}
            wrapped += 1
        stages.append(data)
    if not wrapped:
        raise CompressError("--lowrank-compensate needs a quantization stage to compensate, and the recipe has none")
    spent = {key: value for key, value in flags.items() if not key.startswith("stages.")}
    return spent, [*overrides, f"stages={json.dumps(stages)}"]
