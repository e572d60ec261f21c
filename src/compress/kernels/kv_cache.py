"""FP8 (e4m3) KV cache: keys (after RoPE) and values quantized with static calibrated scales as they enter the
cache, the arithmetic vLLM serves from compressed-tensors' ``kv_cache_scheme`` and ``self_attn.k_scale`` /
``self_attn.v_scale``.

How it hooks in without a custom attention: a transformers attention module calls ``cache.update(keys,
values, layer_idx, ...)`` with its post-RoPE keys and uses what comes back. A forward pre-hook hands it a
``QuantizingCache`` in place of its cache argument (``cache`` in transformers >= 5.2x, ``past_key_values``
before): ``update`` quantizes both tensors (``clamp(x / s, ±448)`` to e4m3 and back, float32 math) and then
passes them to the real cache, or returns them when there is none (a plain forward), so prefill, decode and
evaluation all read the quantized values. compressed-tensors' own ``QuantizedKVCache`` does the same; its
detection looks only for ``past_key_value(s)``, so with transformers 5.24 (whose attention takes ``cache``)
the released reader silently skips ``kv_cache_scheme``; we recognise all three names.

Scales are one per layer (``strategy: tensor``, shape ``[1]``) or one per KV head (``attn_head``,
``[kv_heads, 1, 1]``, as compressed-tensors initialises them), in the model dtype. They live as non-persistent
buffers: the block state a resumable sweep saves stays that of the architecture, and the export writes them
itself (``kv_cache_tensors``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from compress.core.errors import CompressError
from compress.core.unpacked import fp8_quant_dequant, fp8_static_scale

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
"""What transformers has called an attention module's cache argument, newest first."""
STRATEGIES = ("tensor", "attn_head")
SCALE_NAMES = ("k_scale", "v_scale")
QUANTIZER_ATTR = "_compress_kv_quantizer"


def cache_argument(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes its KV cache, None when it takes none."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention modules that write a KV cache: an ``...Attention`` class with ``k_proj`` and ``v_proj`` and a
    cache argument (what compressed-tensors and vLLM target), by full name."""
    found = {}
    for name, module in model.named_modules():
        if "attention" in type(module).__name__.lower() and hasattr(module, "k_proj") and hasattr(module, "v_proj") \
                and cache_argument(module) is not None:
            found[name] = module
    return found


def kv_heads(module: nn.Module) -> int:
    """The number of KV heads of an attention module, from its config (grouped-query attention included)."""
    config = getattr(module, "config", None)
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    if not heads:
        raise CompressError(f"{type(module).__name__} does not say how many key/value heads it has, so per-head "
                            "KV-cache scales cannot be shaped; use strategy tensor")
    return int(heads)


def scale_shape(module: nn.Module, strategy: str) -> tuple[int, ...]:
    return (1,) if strategy == "tensor" else (kv_heads(module), 1, 1)


def quantize_kv(x: Tensor, scale: Tensor) -> Tensor:
    """``x [batch, heads, seq, head_dim]`` through e4m3 with ``scale`` (``[1]`` or ``[heads, 1, 1]``), back in
    ``x.dtype``."""
    return fp8_quant_dequant(x, scale)


class QuantizingCache:
    """Stands in for an attention module's cache for one forward: ``update`` applies ``transform`` to the keys
    and values, then hands them to the real cache (or returns them when the forward has none). Every other
    attribute is the real cache's, so a model that reads the cache structurally still works."""

    def __init__(self, transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], cache: Any | None) -> None:
        self._transform = transform
        self._cache = cache

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        key_states, value_states = self._transform(key_states, value_states)
        if self._cache is None:
            return key_states, value_states
        return self._cache.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise AttributeError(name)
        return getattr(cache, name)


def _wrap_cache(module: nn.Module, transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> RemovableHandle:
    """A forward pre-hook giving ``module`` a ``QuantizingCache`` around whatever cache it was called with."""
    argument = cache_argument(module)
    if argument is None:
        raise CompressError(f"{type(module).__name__} takes no KV cache argument, so its cache cannot be quantized")

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        real = None
        for name in CACHE_ARGUMENTS:  # the deprecated spellings too: transformers renames them on the way in
            if name in kwargs:
                real = kwargs.pop(name) if name != argument else kwargs[name]
        kwargs[argument] = QuantizingCache(transform, real)
        return args, kwargs

    return module.register_forward_pre_hook(hook, with_kwargs=True)


class KVQuantizer:
    """The FP8 KV-cache quantization of one attention module: its two scale buffers and the hook."""

    def __init__(self, module: nn.Module, strategy: str, k_scale: Tensor, v_scale: Tensor) -> None:
        if strategy not in STRATEGIES:
            raise CompressError(f"KV-cache strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        shape = scale_shape(module, strategy)
        for name, value in zip(SCALE_NAMES, (k_scale, v_scale), strict=True):
            if tuple(value.shape) != shape or not bool(torch.isfinite(value).all()) or float(value.min()) <= 0:
                raise CompressError(f"{name} must hold positive finite values of shape {list(shape)} for strategy "
                                    f"{strategy}, got {list(value.shape)}")
            module.register_buffer(name, value.detach().clone(), persistent=False)
        self.strategy = strategy
        self._module = module
        self._handle = _wrap_cache(module, self._quantize)

    def _quantize(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        return quantize_kv(keys, self._module.k_scale), quantize_kv(values, self._module.v_scale)

    def remove(self) -> None:
        self._handle.remove()
        for name in SCALE_NAMES:
            delattr(self._module, name)


def install_kv_quantizer(module: nn.Module, strategy: str, k_scale: Tensor, v_scale: Tensor) -> KVQuantizer:
    """Quantize ``module``'s KV cache from now on (replacing an earlier quantizer of it)."""
    previous = getattr(module, QUANTIZER_ATTR, None)
    if previous is not None:
        previous.remove()
    quantizer = KVQuantizer(module, strategy, k_scale, v_scale)
    setattr(module, QUANTIZER_ATTR, quantizer)
    return quantizer


def kv_quantizer(module: nn.Module) -> KVQuantizer | None:
    return getattr(module, QUANTIZER_ATTR, None)


class KVAbsMax:
    """Largest ``|key|`` and ``|value|`` per KV head over every forward while installed (calibration)."""

    def __init__(self, module: nn.Module) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.tokens = 0
        self._handle = _wrap_cache(module, self._observe)

    @staticmethod
    def _fold(seen: Tensor | None, x: Tensor) -> Tensor:
        batch_max = x.detach().abs().float().amax(dim=(0, 2, 3))  # [batch, heads, seq, dim] → [heads]
        return batch_max if seen is None else torch.maximum(seen, batch_max)

    def _observe(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        self.keys, self.values = self._fold(self.keys, keys), self._fold(self.values, values)
        self.tokens += keys.shape[0] * keys.shape[2]
        return keys, values

    def remove(self) -> None:
        self._handle.remove()

    def scales(self, module: nn.Module, strategy: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``absmax / 448`` per head or per tensor, in ``dtype`` (``core.unpacked.fp8_static_scale``)."""
        if self.keys is None or self.values is None:
            raise CompressError("no calibration forward reached this attention's KV cache, so its scales are unknown")
        shape = scale_shape(module, strategy)
        out = []
        for absmax in (self.keys, self.values):
            if strategy == "tensor":
                absmax = absmax.amax().reshape(1)
            elif absmax.numel() != shape[0]:
                raise CompressError(f"saw {absmax.numel()} key/value heads where the config says {shape[0]}")
            out.append(fp8_static_scale(absmax.reshape(shape), dtype))
        return out[0], out[1]


def kv_cache_tensors(model: nn.Module) -> dict[str, Tensor]:
    """``<attention>.k_scale`` / ``.v_scale`` of every quantized KV cache, for the checkpoint."""
    tensors = {}
    for name, module in model.named_modules():
        if kv_quantizer(module) is not None:
            for leaf in SCALE_NAMES:
                tensors[f"{name}.{leaf}"] = getattr(module, leaf).detach().to("cpu").contiguous()
    return tensors


def kv_cache_strategy(model: nn.Module) -> str | None:
    """The one strategy every quantized KV cache of ``model`` uses (None: none is quantized)."""
    strategies = {q.strategy for m in model.modules() if (q := kv_quantizer(m)) is not None}
    if len(strategies) > 1:
        raise CompressError("the KV caches of this model are quantized with different strategies, which one "
                            "kv_cache_scheme cannot express")
    return next(iter(strategies), None)


def kv_cache_scheme(strategy: str) -> dict[str, Any]:
    """compressed-tensors' ``kv_cache_scheme`` block for FP8 static scales with ``strategy``."""
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "group_size": None,
            "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}, "block_structure": None}


def read_kv_cache_scheme(block: Any) -> str:
    """The strategy of a checkpoint's ``kv_cache_scheme``; one-sentence refusal for what is not FP8 static."""
    if not isinstance(block, dict):
        raise CompressError("kv_cache_scheme in quantization_config must be a mapping")
    strategy = str(block.get("strategy", "tensor")).lower()
    if block.get("type", "int") != "float" or block.get("num_bits") != 8 or block.get("dynamic", False) \
            or not block.get("symmetric", True) or strategy not in STRATEGIES:
        raise CompressError("kv_cache_scheme is served here only as FP8 e4m3 static symmetric scales per tensor or "
                            f"per attention head; this one is {block.get('num_bits')}-bit {block.get('type')} "
                            f"{strategy}{' dynamic' if block.get('dynamic') else ''}")
    return strategy
