"""``kv_cache``: calibrate FP8 (e4m3) scales for every attention's keys and values (``--kv-cache fp8``).

A recipe's last stage: the keys a model caches are post-RoPE projections of the block's input, so they depend
on every weight the stages before changed (a rotation turns the value heads, quantized q/k/v weights change
what they produce). The sweep runs each block, as compressed by the stages before, on its calibration inputs
with an observer in place of the cache, takes the largest ``|key|`` and ``|value|`` (per layer, or per KV
head), and from then on the block quantizes its cache with ``scale = absmax / 448`` (``kernels/kv_cache.py``),
so the next block calibrates on what the deployed model computes. The export writes the scales as
``self_attn.k_scale`` / ``v_scale`` with compressed-tensors' ``kv_cache_scheme`` (what vLLM reads for
``kv_cache_dtype=fp8``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from compress.passes.base import PASSES, Pass, PassConfig, Scope

STRATEGY_NAMES = {"tensor": "tensor", "head": "attn_head"}
"""Recipe spelling → compressed-tensors' strategy."""


class KVCacheConfig(PassConfig):
    """FP8 KV-cache scales. ``strategy``: one scale per layer for keys and one for values (``tensor``, what
    every vLLM attention backend reads), or one per KV head (``head``, compressed-tensors ``attn_head``)."""

    method: Literal["kv_cache"] = "kv_cache"
    format: Literal["fp8"] = "fp8"
    strategy: Literal["tensor", "head"] = "tensor"
    ignore: list[str] = []


@PASSES.register("kv_cache")
class KVCachePass(Pass):
    """Calibrates and installs KV-cache quantization; touches no linear layer."""

    config_cls = KVCacheConfig
    scope: ClassVar[Scope] = "cache"
    needs_calibration: ClassVar[bool] = True
    needs_dense_weights: ClassVar[bool] = False
    takes_stage_flags: ClassVar[bool] = False

    def __init__(self, config: KVCacheConfig) -> None:
        super().__init__(config)
        self.config: KVCacheConfig = config

    @property
    def strategy(self) -> str:
        """compressed-tensors' name of the configured strategy."""
        return STRATEGY_NAMES[self.config.strategy]

    def describe(self) -> str:
        return "kv-fp8" if self.config.strategy == "tensor" else "kv-fp8-head"
