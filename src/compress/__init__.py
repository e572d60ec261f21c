"""compress: make Hugging Face models smaller and faster.

Public API (imported lazily so ``import compress`` and ``compress --help`` stay fast):

- ``compress.run(recipe, out_dir)`` — run a Recipe end to end, return a ``RunResult``.
- ``compress.load(path, device="auto", kernel="auto")`` — a compressed checkpoint as a runnable model.
- ``compress.Recipe``, ``compress.QuantScheme``, ``compress.CompressError``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CompressError", "QuantScheme", "Recipe", "load", "run"]

_LAZY = {
    "run": ("compress.pipeline.run", "run"),
    "load": ("compress.export.load", "load"),
    "Recipe": ("compress.recipes.schema", "Recipe"),
    "QuantScheme": ("compress.core.scheme", "QuantScheme"),
    "CompressError": ("compress.core.errors", "CompressError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
