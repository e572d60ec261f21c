"""The ``kv_cache`` stage as a sweep step: per block, observe each attention's keys and values on the block's
calibration inputs (the block as the earlier stages left it), then install the FP8 quantizer with those scales
so the block's outputs, which feed the next block, are what the deployed model computes.

The scales are the step's resume state (``after_block`` / ``restore_block``), not block tensors: the quantizer
keeps them in non-persistent buffers, so a block checkpoint stays loadable into a fresh architecture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.calibrate.capture import block_output
from compress.core.errors import CompressError
from compress.kernels.kv_cache import KVAbsMax, attention_modules, install_kv_quantizer, kv_quantizer
from compress.passes.quantize.kv_cache import KVCachePass
from compress.pipeline.sequential import BlockContext, Step


class KVCacheStep(Step):
    """``kv_cache`` applied to every attention inside the blocks."""

    label = "calibrate KV cache"
    needs_calibration = True

    def __init__(self, kv_pass: KVCachePass) -> None:
        self.kv_pass = kv_pass
        self.method = kv_pass.config.method

    def start(self, model: nn.Module) -> None:
        if not attention_modules(model):
            raise CompressError(f"--kv-cache: {type(model).__name__} has no attention module with k_proj, v_proj and "
                                "a cache argument (what compressed-tensors and vLLM quantize), so there is no KV "
                                "cache to quantize")

    def run_block(self, ctx: BlockContext) -> None:
        attentions = attention_modules(ctx.block)
        if not attentions:
            return
        observers = {name: KVAbsMax(module) for name, module in attentions.items()}
        try:
            for item in ctx.inputs:
                block_output(ctx.block, item.to(ctx.device))
        finally:
            for observer in observers.values():
                observer.remove()
        dtype = ctx.inputs[0].hidden.dtype  # the model's compute dtype (its linears may hold codes only now)
        for name, module in attentions.items():
            k_scale, v_scale = observers[name].scales(module, self.kv_pass.strategy, dtype)
            install_kv_quantizer(module, self.kv_pass.strategy, k_scale, v_scale)

    def after_block(self, index: int, block: nn.Module) -> dict[str, Any] | None:
        scales = {}
        for name, module in attention_modules(block).items():
            if kv_quantizer(module) is not None:
                scales[name] = {"k": module.k_scale.float().flatten().tolist(), "v": module.v_scale.float().flatten().tolist(),
                                "dtype": str(module.k_scale.dtype).removeprefix("torch.")}
        return {"kv_scales": scales}

    def restore_block(self, index: int, block: nn.Module, state: dict[str, Any] | None) -> None:
        scales = (state or {}).get("kv_scales") or {}
        attentions = attention_modules(block)
        for name, entry in scales.items():
            module = attentions.get(name)
            if module is None:
                raise CompressError(f"the resume state names attention {name}, which block {index} does not have")
            dtype = getattr(torch, entry["dtype"])
            shape = (1,) if self.kv_pass.strategy == "tensor" else (len(entry["k"]), 1, 1)
            install_kv_quantizer(module, self.kv_pass.strategy, torch.tensor(entry["k"], dtype=dtype).reshape(shape),
                                 torch.tensor(entry["v"], dtype=dtype).reshape(shape))
