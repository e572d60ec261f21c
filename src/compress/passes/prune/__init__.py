"""Pruners; each module registers itself in ``compress.passes.base.PASSES``."""

from compress.passes.prune import magnitude, sparsegpt, structured, wanda  # noqa: F401
