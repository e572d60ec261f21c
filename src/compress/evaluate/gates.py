"""Eval gates: thresholds a run must meet, turned into exit code 3 by the CLI.

Gates are checked against the metrics of the exported artifact. A gate asked for a metric that does
not apply (perplexity on an encoder) is bad input, not a failure: the user should hear that at once
rather than see a gate that silently passed. "At once" means before any weights load: a gate given while
eval is disabled is refused by the Recipe itself, and :func:`check_gates_apply` refuses, from the model's
config alone, a gate its kind of model cannot measure; :func:`check_gates` still refuses what slips through.
This module imports no torch so the CLI can use it cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compress.core.errors import CompressError, GateFailed


@dataclass
class Gate:
    """One threshold and how the run did against it; ``message`` is one sentence for the terminal."""

    name: str
    threshold: float
    value: float | None
    passed: bool
    message: str


_PPL_ON_ENCODER = "--max-ppl-increase needs perplexity, which does not apply to encoder models"
_COSINE_ON_LM = "--min-cosine needs embedding cosine, which applies only to encoder models"


def check_gates_apply(kind: str, *, max_ppl_increase: float | None = None, min_cosine: float | None = None,
                      min_compression_ratio: float | None = None, has_baseline: bool = True) -> None:
    """Refuse a gate that ``kind`` of model (``causal-lm`` or ``encoder``, from its config) cannot measure,
    or that needs a baseline when there is none; called before any weights load."""
    if max_ppl_increase is not None and kind == "encoder":
        raise CompressError(f"{_PPL_ON_ENCODER}; use --min-cosine for encoders")
    if min_cosine is not None and kind != "encoder":
        raise CompressError(f"{_COSINE_ON_LM}; use --max-ppl-increase for a {kind} model")
    if not has_baseline:
        for value, flag in ((max_ppl_increase, "--max-ppl-increase"), (min_cosine, "--min-cosine"),
                            (min_compression_ratio, "--min-compression-ratio")):
            if value is not None:
                raise CompressError(f"{flag} compares with a baseline model, so it needs --baseline")


def _metric(metrics: dict, key: str, flag: str, why: str) -> float:
    value = metrics.get(key)
    if value is None:
        raise CompressError(f"{flag} needs {why}")
    return float(value)


def _is_encoder(metrics: dict) -> bool:
    return metrics.get("kind") == "encoder" or metrics.get("cosine") is not None


def _unmeasured(metrics: dict, what: str) -> str:
    """Why a metric is absent: not measured at all (eval disabled) or not against a baseline."""
    if not metrics.get("kind"):
        return f"{what}, which was not measured (is eval disabled?)"
    return f"{what}, which is measured only against a baseline model (--baseline)"


def _ppl_gate(value: float, threshold: float) -> Gate:
    passed = value <= threshold  # NaN fails
    head = f"perplexity increase {value:.2%}"
    if passed:
        message = f"{head} within --max-ppl-increase {threshold:.2%}"
    else:
        message = (
            f"{head} exceeds --max-ppl-increase {threshold:.2%} by {(value - threshold) * 100:.2f} points"
        )
    return Gate("max_ppl_increase", threshold, value, passed, message)


def _ratio_gate(value: float, threshold: float) -> Gate:
    passed = value >= threshold
    head = f"compression ratio {value:.2f}x"
    if passed:
        message = f"{head} meets --min-compression-ratio {threshold:.2f}x"
    else:
        message = f"{head} is below --min-compression-ratio {threshold:.2f}x by {threshold - value:.2f}"
    return Gate("min_compression_ratio", threshold, value, passed, message)


def _cosine_gate(value: float, threshold: float) -> Gate:
    passed = value >= threshold
    head = f"embedding cosine {value:.4f}"
    if passed:
        message = f"{head} meets --min-cosine {threshold:.4f}"
    else:
        message = f"{head} is below --min-cosine {threshold:.4f} by {threshold - value:.4f}"
    return Gate("min_cosine", threshold, value, passed, message)


def check_gates(
    metrics: dict,
    *,
    max_ppl_increase: float | None = None,
    min_compression_ratio: float | None = None,
    min_cosine: float | None = None,
) -> list[Gate]:
    """One Gate per threshold given, in a fixed order; raises CompressError when a metric does not apply.

    ``metrics`` keys: ``ppl_increase`` (relative, 0.05 = 5%), ``compression_ratio`` (baseline bytes /
    compressed bytes), ``cosine`` (mean embedding cosine). A value of None counts as absent.
    """
    gates: list[Gate] = []
    if max_ppl_increase is not None:
        if _is_encoder(metrics):
            raise CompressError(_PPL_ON_ENCODER)
        value = _metric(metrics, "ppl_increase", "--max-ppl-increase", _unmeasured(metrics, "the perplexity increase"))
        gates.append(_ppl_gate(value, float(max_ppl_increase)))
    if min_compression_ratio is not None:
        value = _metric(
            metrics,
            "compression_ratio",
            "--min-compression-ratio",
            "the compression ratio, which was not measured",
        )
        gates.append(_ratio_gate(value, float(min_compression_ratio)))
    if min_cosine is not None:
        lm = metrics.get("ppl") is not None or metrics.get("ppl_increase") is not None
        if metrics.get("kind") not in (None, "encoder") or lm:
            raise CompressError(_COSINE_ON_LM)
        value = _metric(metrics, "cosine", "--min-cosine", _unmeasured(metrics, "embedding cosine"))
        gates.append(_cosine_gate(value, float(min_cosine)))
    for gate in gates:
        if math.isnan(gate.value):
            gate.message = f"--{gate.name.replace('_', '-')} cannot pass: the measured value is NaN"
    return gates


def raise_if_failed(gates: list[Gate], report: dict) -> None:
    """Raise GateFailed carrying ``report`` (so ``--json`` still prints it) if any gate failed."""
    failed = [g.message for g in gates if not g.passed]
    if failed:
        raise GateFailed("; ".join(failed), report)
