"""Compression passes. Importing this package registers every built-in method in ``PASSES``."""

from compress.passes import prune as _prune  # noqa: F401  (registers the pruners)
from compress.passes import quantize as _quantize  # noqa: F401  (registers the quantizers)
from compress.passes import rotate as _rotate  # noqa: F401  (registers the rotations)
from compress.passes.base import PASSES, LayerPass, PassConfig

__all__ = ["PASSES", "LayerPass", "PassConfig"]
