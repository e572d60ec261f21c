"""Weight quantizers; each module registers itself in ``compress.passes.base.PASSES``."""

from compress.passes.quantize import rtn  # noqa: F401
