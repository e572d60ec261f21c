"""Function-preserving transforms of the whole model; each module registers itself in ``PASSES``."""

from compress.passes.rotate import hadamard  # noqa: F401
