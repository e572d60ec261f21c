"""Forward paths for ``QuantLinear`` and how one is chosen per layer.

A path serves some storage layouts (``formats``: the codec names, e.g. ``pack-quantized``) on some device
types (``devices``), registered once (``register_path``) and looked up per (codec, device) of each layer.
It turns a layer's checkpoint buffers (its typed storage, ``QuantLinear.storage()``) into a fast forward: it may ``prepare`` device-specific
buffers once at load (e.g. repack int4 codes into the layout of an aten kernel, kept as non-persistent
buffers so ``state_dict()`` stays the checkpoint), then ``forward`` uses them. The reference path
(dequantize, then matmul; ``compress::dequant_matmul`` for packed codes) serves every layer of every
layout and is the oracle in tests.

Selection: ``kernel="auto"`` (or ``COMPRESS_KERNEL=auto``) never makes a layer slower than its dense
original. Per layer it takes the first path in ``AUTO_ORDER`` that supports the layer on its device and
times it against a plain matmul on the dequantized weight, for one decode row and one prefill block; the
packed path is kept only where it is at least as fast on both, otherwise (and for layers only the
reference path serves, which dequantizes on every call) the layer gets the ``dense`` path: its weight
dequantized once at load, exact like the reference, at the memory cost of a dense layer. Timings are
cached per (path, shape, dtype, device) within one load. An explicit name forces that path and fails
with one sentence if a layer cannot use it (no silent wrong results, no silent slow fallback).
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from compress.core.errors import CompressError
from compress.core.registry import Registry

if TYPE_CHECKING:
    from compress.kernels.quant_linear import QuantLinear

ENV_VAR = "COMPRESS_KERNEL"


class KernelPath(ABC):
    """One way to compute ``x @ W^T + b`` from a layer's quantized storage."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...] | None] = None
    """The storage layouts (codec names) this path computes from; None: every layout."""
    devices: ClassVar[tuple[str, ...] | None] = None
    """The device types it runs on; None: any (a path may refine this in ``check``)."""

    def serves(self, fmt: str, device_type: str) -> bool:
        """Registered for this (codec, device) pair."""
        return (self.formats is None or fmt in self.formats) and (self.devices is None or device_type in self.devices)

    def unsupported(self, layer: QuantLinear) -> str | None:
        """Why this path cannot serve ``layer`` on the device its buffers are on, or None if it can."""
        if self.formats is not None and layer.format not in self.formats:
            return f"the {self.name} kernels read {' or '.join(self.formats)} layers and this one is {layer.format}"
        return self.check(layer)

    @abstractmethod
    def check(self, layer: QuantLinear) -> str | None:
        """The path's own conditions on a layer of a layout it reads (device, bits, shapes, dtypes)."""

    def prepare(self, layer: QuantLinear) -> None:  # noqa: B027 (optional)
        """Build whatever the forward needs (non-persistent buffers on the layer); called once."""

    @abstractmethod
    def forward(self, layer: QuantLinear, x: Tensor) -> Tensor:
        """Output in ``x.dtype``, shape ``[..., out_features]``."""


KERNELS: Registry[KernelPath] = Registry("kernel")
AUTO_ORDER: list[str] = []  # fastest first; paths append themselves when registered


def register_path(path: KernelPath, *, auto_priority: int | None = None) -> KernelPath:
    KERNELS.register(path.name)(path)
    if auto_priority is not None:
        AUTO_ORDER.insert(min(auto_priority, len(AUTO_ORDER)), path.name)
    return path


class ReferencePath(KernelPath):
    """Dequantize, then matmul (``ops.dequant_matmul``: the ``compress::dequant_matmul`` op for packed codes)."""

    name = "reference"

    def check(self, layer: QuantLinear) -> str | None:
        return None

    def forward(self, layer: QuantLinear, x: Tensor) -> Tensor:
        from compress.kernels.ops import dequant_matmul

        return dequant_matmul(x, layer.storage(), layer.bias)


REFERENCE = ReferencePath()
KERNELS.register("reference")(REFERENCE)


class DensePath(KernelPath):
    """The weight dequantized once at load (a non-persistent buffer), then a plain matmul: the speed of the
    dense original and the reference path's exact numbers, without the memory saving."""

    name = "dense"

    def check(self, layer: QuantLinear) -> str | None:
        return None

    def prepare(self, layer: QuantLinear) -> None:
        layer.register_buffer("_dense_weight", layer.reference_weight(layer.weight_scale.dtype), persistent=False)

    def forward(self, layer: QuantLinear, x: Tensor) -> Tensor:
        weight = layer._dense_weight
        bias = None if layer.bias is None else layer.bias.to(weight.dtype)
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


DENSE = DensePath()
KERNELS.register("dense")(DENSE)


def requested_kernel(kernel: str = "auto") -> str:
    """The explicit argument wins over ``COMPRESS_KERNEL``; both default to auto."""
    choice = kernel if kernel != "auto" else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    _import_paths()
    if choice != "auto" and choice not in KERNELS:
        raise CompressError(f"unknown kernel {choice!r}; use auto, {', '.join(KERNELS.names())}")
    return choice


def _import_paths() -> None:
    """Register the optional paths (each module registers itself; a missing optional dependency skips it)."""
    import importlib

    for module in ("compress.kernels.cpu", "compress.kernels.int8_act", "compress.kernels.triton_path",
                   "compress.kernels.triton_w8a8"):
        try:
            importlib.import_module(module)
        except ImportError:
            continue


def apply_kernel(model: nn.Module, kernel: str = "auto") -> dict[str, int]:
    """Choose and prepare a path for every QuantLinear; returns how many layers use each path."""
    from compress.kernels.quant_linear import QuantLinear

    choice = requested_kernel(kernel)
    counts: dict[str, int] = {}
    verdicts: dict[tuple, bool] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        path = _pick(layer, choice, name, verdicts)
        path.prepare(layer)
        layer.kernel = path
        counts[path.name] = counts.get(path.name, 0) + 1
    return counts


def _pick(layer: QuantLinear, choice: str, name: str, verdicts: dict[tuple, bool] | None = None) -> KernelPath:
    if choice != "auto":
        path = KERNELS.get(choice)
        reason = path.unsupported(layer)
        if reason is not None:
            raise CompressError(f"kernel {choice} cannot run layer {name}: {reason}")
        return path
    device_type = device_of(layer).type
    for candidate in AUTO_ORDER:
        path = KERNELS.get(candidate)
        if path.serves(layer.format, device_type) and path.unsupported(layer) is None:
            return path if pays_off(path, layer, {} if verdicts is None else verdicts) else DENSE
    return DENSE


PREFILL_ROWS = 64
"""Rows of the prefill block timed alongside one decode row when auto decides whether a packed path pays."""


def pays_off(path: KernelPath, layer: QuantLinear, verdicts: dict[tuple, bool]) -> bool:
    """Whether ``path`` runs ``layer`` at least as fast as a dense matmul, for a decode row and a prefill block
    (best of a few calls each, after a warm-up). Decided once per (path, shape, layout, scheme, dtype, device)."""
    key = (path.name, layer.out_features, layer.in_features, layer.format, layer.scheme, layer.weight_scale.dtype,
           device_of(layer))
    if key not in verdicts:
        verdicts[key] = _time_against_dense(path, layer)
    return verdicts[key]


def _time_against_dense(path: KernelPath, layer: QuantLinear) -> bool:
    device = device_of(layer)
    dense = layer.reference_weight(layer.weight_scale.dtype)
    saved, before = layer.kernel, set(layer._buffers)
    pays = False
    try:
        path.prepare(layer)
        layer.kernel = path
        for rows in (1, PREFILL_ROWS):
            x = torch.randn(rows, layer.in_features, dtype=layer.weight_scale.dtype, device=device)
            packed_s = _best_time(lambda x=x: layer(x), device)
            dense_s = _best_time(lambda x=x: torch.nn.functional.linear(x.to(dense.dtype), dense), device)
            if packed_s > dense_s:
                return False
        pays = True
        return True
    finally:
        layer.kernel = saved
        if not pays:  # the packed path's prepared buffers (e.g. repacked codes) are not kept
            for extra in set(layer._buffers) - before:
                del layer._buffers[extra]


def _best_time(call, device: torch.device, repeats: int = 5) -> float:
    with torch.inference_mode():
        call()
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    return best


def device_of(layer: nn.Module) -> torch.device:
    """Where a layer's quantized tensors are (every layout has a ``weight_scale``)."""
    return layer.weight_scale.device
