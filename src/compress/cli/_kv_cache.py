"""``compress quantize --kv-cache fp8|fp8-head``: a ``kv_cache`` stage put last in the recipe.

The stage flags pass a kv_cache stage by (``KVCachePass.takes_stage_flags``), so the option only names the
stage: it replaces the base recipe's trailing kv_cache stage or appends one, as a ``stages=`` override applied
after the ``--rotate`` / ``--smoothquant`` ones (it reads the stages they produced) and before the flags.
"""

from __future__ import annotations

import json
from typing import Any

from compress.core.errors import CompressError

METHOD = "kv_cache"
KINDS = {"fp8": "tensor", "fp8-head": "head"}
"""``--kv-cache`` values → the stage's ``strategy`` (one scale per layer, or per KV head)."""


def kv_cache_overrides(base: str, kv_cache: str | None, overrides: list[str], method: str | None,
                       export_format: str | None) -> list[str]:
    """``overrides`` plus a ``stages=`` override ending in a kv_cache stage (unchanged without ``--kv-cache``);
    one-sentence refusals for an unknown kind, ``--method kv_cache`` and the GPTQ layout."""
    if method == METHOD:
        raise CompressError("kv_cache is not a weight quantization method; give --kv-cache fp8 beside a quantizing "
                            "--method such as gptq or rtn")
    if kv_cache is None:
        return overrides
    if kv_cache not in KINDS:
        raise CompressError(f"unknown --kv-cache {kv_cache!r}; use {' or '.join(KINDS)} (FP8 e4m3 scales per layer "
                            "or per KV head)")
    if export_format == "gptq":
        raise CompressError("the GPTQ layout has no place for KV-cache scales; use --format compressed-tensors "
                            "with --kv-cache")
    from compress.recipes.loader import apply_overrides, load_recipe_data

    listed = apply_overrides(load_recipe_data(base), overrides).get("stages")
    stages: list[Any] = list(listed) if isinstance(listed, list) else []
    if stages and isinstance(stages[-1], dict) and stages[-1].get("method") == METHOD:
        stages = stages[:-1]
    return [*overrides, f"stages={json.dumps([*stages, {'method': METHOD, 'strategy': KINDS[kv_cache]}])}"]
