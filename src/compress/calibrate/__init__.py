"""Calibration: data sources to token tensors (``data``), then block inputs and per-layer statistics.

Names are resolved lazily so importing the package does not import torch or datasets.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BUILTIN_CORPORA": "data",
    "DatasetSpec": "data",
    "TokenSamples": "data",
    "calibration_samples": "data",
    "eval_windows": "data",
    "load_texts": "data",
    "parse_source": "data",
    "tokenize_stream": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
