"""``compress quantize --rotate KIND``: a rotate stage put before the recipe's quantize stages.

The stage flags (``--method``, ``--bits``, ``--ignore``...) apply to every stage of the base recipe
(``compress.recipes.flags``), and a rotation takes none of them, so the leading rotate stages of the base
recipe are set aside, the flags applied to the rest, and the rotation put back first. ``--rotate`` replaces
the base recipe's leading rotation (keeping its seed), or adds one with seed 0.
"""

from __future__ import annotations

import time
from typing import Any

from compress.cli._output import log, print_json, progress_bars
from compress.cli.common import print_plan, print_result


def run_rotated(base: str, flags: dict[str, Any], rotate: str | None, *, overwrite: bool, dry_run: bool,
                as_json: bool, resume: bool) -> bool:
    """Run the recipe with its rotation first and return True; False (nothing done) when there is none
    (no ``--rotate`` and the base recipe starts with no rotate stage): the caller runs it as usual."""
    from compress.core.errors import CompressError
    from compress.pipeline.rotation import rotation_kinds
    from compress.recipes.flags import recipe_from_flags
    from compress.recipes.loader import load_recipe_data, recipe_from_dict

    if flags.get("stages.*.method") == "rotate":
        raise CompressError("rotate is not a quantization method; give --rotate hadamard beside a quantizing --method such as gptq")
    if rotate is not None and rotate not in rotation_kinds():
        raise CompressError(f"unknown --rotate {rotate!r}; use {', '.join(rotation_kinds())}")
    data = load_recipe_data(base)
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    lead: list[dict[str, Any]] = []
    for stage in stages:
        if not (isinstance(stage, dict) and stage.get("method") == "rotate"):
            break
        lead.append(stage)
    if rotate is None and not lead:
        return False
    rest = {**data, "stages": stages[len(lead):]}
    if rotate is not None:
        lead = [{**(lead[0] if lead else {}), "method": "rotate", "kind": rotate}]
    recipe = recipe_from_flags(rest, flags)  # a flag's problem is named by the flag, as without a rotation
    resolved = recipe.model_dump(mode="json")
    resolved["stages"] = [*lead, *resolved["stages"]]
    recipe = recipe_from_dict(resolved)
    if dry_run:
        from compress.pipeline.run import dry_run as plan_only

        print_plan(plan_only(recipe), as_json)
        return True
    from compress.pipeline.run import run

    start = time.perf_counter()
    sweep = "+".join(dict.fromkeys(stage.method for stage in recipe.stages if stage.method != "structured"))
    with progress_bars(what=sweep or None) as progress:
        result = run(recipe, overwrite=overwrite, progress=progress, log=log, resume=resume)
    payload = result.to_dict()
    payload["timings"]["wall_s"] = time.perf_counter() - start
    if as_json:
        print_json(payload)
    else:
        print_result(payload)
    return True
