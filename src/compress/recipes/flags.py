"""CLI flags → Recipe: flags are sugar over the same mapping a YAML recipe holds.

Only flags the user actually gave (not None) are applied, on top of a base recipe (a preset or
``--recipe FILE``). Validation errors name the flag rather than the recipe field when a flag set it.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from compress.core.errors import CompressError
from compress.recipes.loader import validation_message
from compress.recipes.schema import Recipe

# recipe field path → (flag, how the flag reads); stage fields apply to every stage
FLAG_FIELDS: dict[str, str] = {
    "model": "MODEL",
    "dtype": "--dtype",
    "device": "--device",
    "trust_remote_code": "--trust-remote-code",
    "allow_pickle": "--allow-pickle",
    "output": "--output",
    "calibration.dataset": "--dataset",
    "calibration.num_samples": "--num-samples",
    "calibration.seq_len": "--seq-len",
    "calibration.seed": "--seed",
    "eval.enabled": "--eval/--no-eval",
    "eval.dataset": "--eval-dataset",
    "eval.max_windows": "--eval-windows",
    "eval.max_ppl_increase": "--max-ppl-increase",
    "eval.min_compression_ratio": "--min-compression-ratio",
    "stages.*.method": "--method",
    "stages.*.bits": "--bits",
    "stages.*.group_size": "--group-size",
    "stages.*.symmetric": "--sym/--asym",
    "stages.*.ignore": "--ignore",
    "stages.*.act_order": "--act-order",
    "stages.*.damp": "--damp",
    "stages.*.block_size": "--block-size",
    "stages.*.static_groups": "--static-groups",
    "stages.*.observer": "--observer",
    "stages.*.indivisible": "--indivisible",
    "stages.*.sparsity": "--sparsity",
    "stages.*.pattern": "--pattern",
    "stages.*.per_layer": "--per-layer-sparsity",
    "stages.*.target": "--structured",
    "stages.*.ratio": "--ratio",
}


def _fields_of(method: str) -> set[str] | None:
    """The stage fields ``method``'s config accepts (None for an unknown method: validation names it)."""
    from compress.passes import PASSES

    if method not in PASSES:
        return None
    return set(PASSES.get(method).config_cls.model_fields) - {"method"}


def apply_flags(base: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """``flags`` maps recipe field paths (as in FLAG_FIELDS) to values; None means 'not given'."""
    data = copy.deepcopy(base)
    for path, value in flags.items():
        if value is None:
            continue
        parts = path.split(".")
        if parts[0] == "stages":
            stages = data.setdefault("stages", [{}])
            for stage in stages:
                if parts[-1] == "method" and stage.get("method") != value:
                    # a different method keeps only the base recipe's fields that it also has
                    accepted = _fields_of(value) or set()
                    keep = {k: v for k, v in stage.items() if k in accepted}
                    stage.clear()
                    stage.update(keep)
                stage[parts[-1]] = value
            continue
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def recipe_from_flags(base: dict[str, Any], flags: dict[str, Any]) -> Recipe:
    data = apply_flags(base, flags)
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        loc = [str(p) for p in first["loc"]]
        key = ".".join("*" if (i == 1 and loc[0] == "stages") else p for i, p in enumerate(loc))
        # discriminated unions insert the method tag into the path: stages.0.rtn.bits
        if loc and loc[0] == "stages" and len(loc) >= 4:
            key = f"stages.*.{loc[-1]}"
        flag = FLAG_FIELDS.get(key)
        if flag is not None and _given(flags, key) and first["type"] == "extra_forbidden":
            methods = sorted({stage.get("method", "?") for stage in data.get("stages", [])})
            raise CompressError(f"{flag} does not apply to --method {', '.join(methods)}") from None
        if flag is not None and _given(flags, key):
            raise CompressError(f"{flag}: {first['msg']}") from None
        raise CompressError(validation_message(error)) from None


def _given(flags: dict[str, Any], key: str) -> bool:
    return flags.get(key) is not None
