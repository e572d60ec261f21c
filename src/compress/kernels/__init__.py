"""Compute for packed weights: the reference oracle, the ``compress::dequant_matmul`` op, QuantLinear.

Names are resolved lazily so importing ``compress.kernels`` costs nothing until one is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QuantLinear", "dequant_matmul", "dequant_matmul_reference"]

_WHERE = {
    "QuantLinear": "compress.kernels.quant_linear",
    "dequant_matmul": "compress.kernels.ops",
    "dequant_matmul_reference": "compress.kernels.reference",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
