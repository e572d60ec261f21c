"""``compress quantize --rotate KIND``: a rotate stage put before the recipe's other stages.

The stage flags (``--method``, ``--bits``, ``--ignore``...) pass a rotation by (``Pass.takes_stage_flags``),
so ``--rotate`` only has to name the stage: it replaces the base recipe's leading rotation (keeping its seed)
or adds one with seed 0, as a ``stages=`` override of the base recipe that ``execute_recipe`` applies before
the flags.
"""

from __future__ import annotations

import json
from typing import Any

from compress.core.errors import CompressError


def rotation_overrides(base: str, rotate: str | None, method: str | None) -> list[str]:
    """The overrides that put a ``rotate`` stage of ``rotate``'s kind first ([] without ``--rotate``);
    one-sentence refusals for ``--method rotate`` and an unknown kind."""
    if method == "rotate":
        raise CompressError("rotate is not a quantization method; give --rotate hadamard beside a quantizing "
                            "--method such as gptq")
    if rotate is None:
        return []
    from compress.passes.rotate.hadamard import ONLINE_KINDS, ONLINE_REFUSED
    from compress.pipeline.rotation import rotation_kinds
    from compress.recipes.loader import load_recipe_data

    if rotate in ONLINE_KINDS:
        raise CompressError(ONLINE_REFUSED)
    if rotate not in rotation_kinds():
        raise CompressError(f"unknown --rotate {rotate!r}; use {', '.join(rotation_kinds())}")
    listed = load_recipe_data(base).get("stages")
    stages: list[Any] = list(listed) if isinstance(listed, list) else []
    lead = 0
    while lead < len(stages) and isinstance(stages[lead], dict) and stages[lead].get("method") == "rotate":
        lead += 1
    first = {**(stages[0] if lead else {}), "method": "rotate", "kind": rotate}
    return [f"stages={json.dumps([first, *stages[lead:]])}"]
