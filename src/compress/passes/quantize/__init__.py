"""Weight quantizers; each module registers itself in ``compress.passes.base.PASSES``."""

from compress.passes.quantize import autoround, awq, gptq, hqq, kv_cache, lowrank, rtn, smoothquant  # noqa: F401
