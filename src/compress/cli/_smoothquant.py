"""``compress quantize --smoothquant ALPHA``: a smoothquant stage put before the recipe's quantize stages.

SmoothQuant only pays under activation quantization, so the option is refused unless every quantizing stage
of the resolved recipe quantizes its inputs to int8 (``--scheme w8a8-int8``, or a W8A8 base recipe). The
stage flags (``--method``, ``--bits``, ``--ignore``...) pass a smoothquant stage by
(``SmoothQuantPass.takes_stage_flags``), so the option only has to name the stage: it replaces the base
recipe's smoothquant stage (keeping its other fields) or adds one, after the leading transform (rotate) and
structured stages, as a ``stages=`` override applied after the ``--rotate`` one and before the flags.
"""

from __future__ import annotations

import json
from typing import Any

from compress.core.errors import CompressError

METHOD = "smoothquant"


def parse_alpha(text: str) -> float | str:
    """``auto`` or a number in ``[0, 1]``; a one-sentence refusal otherwise."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        alpha = float(text)
    except ValueError:
        alpha = float("nan")
    if not 0.0 <= alpha <= 1.0:  # also refuses nan
        raise CompressError(f"--smoothquant takes a migration strength in [0, 1] or auto, got {text!r}")
    return alpha


def smoothquant_overrides(base: str, flags: dict[str, Any], alpha: str | None, overrides: list[str],
                          method: str | None) -> list[str]:
    """``overrides`` with a ``stages=`` override that puts a smoothquant stage of ``alpha`` before the quantize
    stages (unchanged without ``--smoothquant``); one-sentence refusals for ``--method smoothquant``, a bad
    alpha and a recipe whose quantizers do not quantize activations to int8."""
    if method == METHOD:
        raise CompressError("smoothquant is not a quantization method; give --smoothquant ALPHA beside "
                            "--scheme w8a8-int8 and a quantizing --method such as gptq or rtn")
    if alpha is None:
        return overrides
    value = parse_alpha(alpha)
    from compress.passes import PASSES
    from compress.recipes.flags import recipe_from_flags
    from compress.recipes.loader import apply_overrides, load_recipe_data

    data = apply_overrides(load_recipe_data(base), overrides)
    recipe = recipe_from_flags(data, flags)  # a flag's problem is named by its flag, as without the option
    quantizers = [stage for stage in recipe.stages if PASSES.get(stage.method)(stage).quantizes()]
    if not quantizers or any(getattr(stage, "activations", None) != "int8-dynamic" for stage in quantizers):
        raise CompressError("--smoothquant moves activation outliers into the weights, which pays only when the "
                            "activations are quantized too, so it needs --scheme w8a8-int8")
    listed = data.get("stages")
    stages: list[Any] = list(listed) if isinstance(listed, list) else []
    at = 0
    while at < len(stages) and isinstance(stages[at], dict) and _leads(stages[at].get("method")):
        at += 1
    kept = stages[at] if at < len(stages) and isinstance(stages[at], dict) and \
        stages[at].get("method") == METHOD else None
    stage = {**(kept or {}), "method": METHOD, "alpha": value}
    rest = stages[at + 1:] if kept is not None else stages[at:]
    return [*overrides, f"stages={json.dumps([*stages[:at], stage, *rest])}"]


def _leads(method: Any) -> bool:
    """Stages that come before a smoothing stage: transforms (a rotation) and shape changes (structured)."""
    from compress.passes import PASSES

    if not isinstance(method, str) or method not in PASSES:
        return False
    cls = PASSES.get(method)
    return cls.scope == "transform" or cls.changes_shapes
