"""Evaluation of a compressed model: perplexity, KL and top-1 against the baseline, embedding
similarity, sizes, and gates.

Names are loaded lazily so ``from compress.evaluate.gates import ...`` (used by the CLI) does not pull
in torch through this package's ``__init__``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "metrics": (
        "LMScores", "ComparisonScores", "EmbeddingScores", "perplexity", "compare_lm",
        "mean_pooled_embeddings", "compare_embeddings",
    ),
    "size": ("dir_size_bytes", "parameter_count", "weights_bytes_by_component", "safetensors_header_meta",
             "lowrank_header_meta"),
    "gates": ("Gate", "check_gates", "raise_if_failed"),
}  # fmt: skip
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
