"""Weight quantizers; each module registers itself in ``compress.passes.base.PASSES``."""

from compress.passes.quantize import awq, gptq, lowrank, rtn  # noqa: F401
