"""CLI flags → Recipe: flags are sugar over the same mapping a YAML recipe holds.

Only flags the user actually gave (not None) are applied, on top of a base recipe (a preset or
``--recipe FILE``). Validation errors name the flag rather than the recipe field when a flag set it.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from compress.core.errors import CompressError
from compress.recipes.loader import clean_loc, error_reason, validation_message
from compress.recipes.schema import Recipe

# recipe field path → (flag, how the flag reads); stage fields apply to every stage that takes stage flags
# (``Pass.takes_stage_flags``: all but transforms such as a rotation)
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
    "calibration.doc_separator": "--doc-separator",
    "eval.enabled": "--eval/--no-eval",
    "eval.dataset": "--eval-dataset",
    "eval.seq_len": "--eval-seq-len",
    "eval.doc_separator": "--doc-separator",
    "eval.max_windows": "--eval-windows",
    "eval.max_ppl_increase": "--max-ppl-increase",
    "eval.min_compression_ratio": "--min-compression-ratio",
    "eval.min_cosine": "--min-cosine",
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
    "stages.*.activations": "--scheme",
    "stages.*.sparsity": "--sparsity",
    "stages.*.pattern": "--pattern",
    "stages.*.per_layer": "--per-layer-sparsity",
    "stages.*.target": "--structured",
    "stages.*.ratio": "--ratio",
    "export.format": "--format",
    "export.sparse_format": "--sparse-format",
}


def _takes_stage_flags(stage: Any) -> bool:
    """Whether the stage flags address this stage (every stage but a transform such as a rotation)."""
    from compress.passes import PASSES

    method = stage.get("method") if isinstance(stage, dict) else None
    return not (isinstance(method, str) and method in PASSES and not PASSES.get(method).takes_stage_flags)


def _fields_of(method: str) -> set[str] | None:
    """The stage fields ``method``'s config accepts (None for an unknown method: validation names it)."""
    from compress.passes import PASSES

    if method not in PASSES:
        return None
    return set(PASSES.get(method).config_cls.model_fields) - {"method"}


def _kept_for(method: str, stage: dict[str, Any]) -> dict[str, Any]:
    """The base stage's fields a switch to ``method`` keeps: those its config has, with a value of the field's
    type there. A value only the old method takes (gptq's ``observer: auto`` under ``--method rtn``) falls back
    to the new method's default, as a field it lacks does; the user's own flags are applied afterwards."""
    from pydantic import TypeAdapter

    from compress.passes import PASSES

    accepted = _fields_of(method) or set()
    fields = PASSES.get(method).config_cls.model_fields if method in PASSES else {}

    def takes(key: str, value: Any) -> bool:
        try:
            adapter = TypeAdapter(fields[key].annotation)
        except Exception:  # a type pydantic checks only inside its model: keep the value, validation judges it
            return True
        try:
            adapter.validate_python(value)
        except ValidationError:
            return False
        return True

    return {k: v for k, v in stage.items() if k in accepted and takes(k, v)}


# a flag that decides the shape of pruning replaces the base recipe's field for the other shape, so that
# `prune --pattern 1:4` on the 50%-sparsity default is 1:4 (not a conflict with the preset's 0.5), while both
# flags given together are still refused by the stage config
_REPLACES: dict[str, str] = {"stages.*.pattern": "sparsity", "stages.*.sparsity": "pattern"}


def apply_flags(base: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """``flags`` maps recipe field paths (as in FLAG_FIELDS) to values; None means 'not given'."""
    data = copy.deepcopy(base)
    for path, other in _REPLACES.items():
        if flags.get(path) is not None and flags.get(f"stages.*.{other}") is None:
            for stage in data.get("stages") if isinstance(data.get("stages"), list) else []:
                if isinstance(stage, dict) and _takes_stage_flags(stage):
                    stage.pop(other, None)
    for path, value in flags.items():
        if value is None:
            continue
        parts = path.split(".")
        if parts[0] == "stages":
            stages = data.setdefault("stages", [{}])
            for stage in stages if isinstance(stages, list) else []:
                if not isinstance(stage, dict) or not _takes_stage_flags(stage):
                    continue  # not a dict: validation names it; a rotation takes no stage flag
                if parts[-1] == "method" and stage.get("method") != value:
                    # a different method keeps only the base recipe's fields that it also takes
                    keep = _kept_for(value, stage)
                    stage.clear()
                    stage.update(keep)
                stage[parts[-1]] = value
            continue
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break  # e.g. `eval: 5` in the base recipe: validation names it
            node = child
        else:
            node[parts[-1]] = value
    return data


def recipe_from_flags(base: dict[str, Any], flags: dict[str, Any]) -> Recipe:
    data = apply_flags(base, flags)
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        for problem in error.errors():  # a problem a flag caused is named by that flag
            loc = clean_loc(problem["loc"])
            key = ".".join(("*" if (i == 1 and loc[0] == "stages") else p) for i, p in enumerate(loc[:3]))
            flag = FLAG_FIELDS.get(key)
            if flag is None or not _given(flags, key):
                continue
            if problem["type"] == "extra_forbidden":
                stages = data.get("stages") if isinstance(data.get("stages"), list) else []
                methods = sorted({str(s.get("method", "?")) if isinstance(s, dict) else "?" for s in stages
                                  if _takes_stage_flags(s)})
                raise CompressError(f"{flag} does not apply to --method {', '.join(methods)}") from None
            raise CompressError(f"{flag}: {error_reason(problem)}") from None
        raise CompressError(validation_message(error)) from None


def _given(flags: dict[str, Any], key: str) -> bool:
    return flags.get(key) is not None
