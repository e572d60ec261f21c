"""The codec contract: one registered codec per storage layout of a compressed Linear.

Why a registry: the facts of a layout (its tensor names, its ``format`` string, which schemes it can hold,
how to turn its tensors back into a runnable module) were spelled out in every reader and writer
(``"pack-quantized"``, ``weight_packed``, ``_SUFFIXES``, ``BITMASK`` ...). A codec states them once; the
exporter, the loader, ``inspect``, ``convert`` and ``--resume`` iterate ``CODECS`` instead.

A codec has four jobs:

- ``encode``: a dense weight (+ qparams) to the layer's checkpoint tensors (``{leaf: tensor}``);
- ``decode``: those tensors back to the dense weight a reader reconstructs;
- ``config``: its ``name`` is the ``format`` string; ``config(...)`` is its part of the quantization config
  (a compressed-tensors config group without targets, or the GPTQ block);
- ``rebuild``: checkpoint tensors to the runnable module (``QuantLinear`` or a dense ``nn.Linear``) at load
  and resume.

Adding a layout: one module in ``compress/codecs/`` whose codec instance is passed to ``register`` and which
is imported in ``compress/codecs/__init__.py``. Pure tensor math stays in ``core`` (``packing.py``,
``unpacked.py``, ``sparsity.py``); kernel paths declare which codec names they read (``kernels/paths.py``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from compress.core.errors import CompressError
from compress.core.registry import Registry
from compress.core.scheme import QuantScheme
from compress.core.storage import WeightStorage
from compress.kernels.quant_linear import QuantLinear

HeaderMeta = Mapping[str, tuple[str, list[int]]]
"""``{tensor name: (safetensors dtype, shape)}`` as read from headers alone."""

NO_ACTIVATIONS = ("no kernel here quantizes input activations other than W8A8-int8 (int8 per-channel weights, "
                  "int8 per-token dynamic inputs, int-quantized), W4A8 (int4 weights, int8 per-token dynamic inputs, "
                  "pack-quantized) and W8A8-FP8 (e4m3 weights, e4m3 inputs per token dynamic or per tensor static, "
                  "float-quantized), and running them unquantized would compute something other than what was "
                  "calibrated")
"""Why a layout refuses a scheme with ``input_activations`` it cannot run (all but W8A8-int8, W4A8 and
W8A8-FP8)."""


class Codec(ABC):
    """One storage layout of a Linear's weight."""

    name: ClassVar[str]
    """The layout's name: the compressed-tensors ``format`` string, or ``gptq``."""
    quant_method: ClassVar[str | None] = "compressed-tensors"
    """The ``quantization_config.quant_method`` of checkpoints in this layout (None: any, e.g. sparsity)."""
    marker: ClassVar[str]
    """The tensor leaf whose presence says a layer is stored this way (``P.<marker>``)."""
    leaves: ClassVar[tuple[str, ...]]
    """Every leaf the layout stores under a layer prefix, codes first (the bias is not the codec's)."""
    code_leaves: ClassVar[tuple[str, ...]] = ()
    """Leaves holding quantized codes (size reports); the other ``leaves`` are scales, zeros, indices."""
    scale_leaf: ClassVar[str | None] = None
    """The leaf holding the scales (``scale_of`` gives them as ``[out, groups]``)."""
    order_leaf: ClassVar[str | None] = None
    """The leaf holding a column-to-group order (activation ordering), if the layout has one."""
    shape_leaves: ClassVar[tuple[str, ...]] = ()
    """Leaves that only record the true shape (not counted in a layer's bits per weight)."""
    quantized: ClassVar[bool] = True
    """False for layouts of dense values (sparsity): no scheme, and the rebuilt layer is an ``nn.Linear``."""
    readers: ClassVar[tuple[str, ...]] = (
        "This folder uses the compressed-tensors `{name}` layout: transformers reads it with the",
        "`compressed-tensors` package installed (checked against transformers 5.24 + compressed-tensors 0.20):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")",
        "```",
    )
    """The model card's lines on which readers load a folder in this layout (``{name}`` is filled in), naming
    only readers the interop tests check; the card adds what depends on the scheme (vLLM, zero points)."""
    transformers_reads: ClassVar[bool] = True
    """Whether released transformers + compressed-tensors load this layout (the card's serving notes)."""

    # ---- what it can hold ------------------------------------------------------------------------------
    def unsupported(self, scheme: QuantScheme | None) -> str | None:
        """Why this layout cannot hold (or no kernel here can run) layers of ``scheme``; None when it can."""
        return None

    def check(self, scheme: QuantScheme | None, where: str = "") -> None:
        """``unsupported`` as one CompressError sentence."""
        reason = self.unsupported(scheme)
        if reason is not None:
            tag = "" if scheme is None else f" {scheme.tag}"
            raise CompressError(f"{where}quantization{tag} cannot be served as {self.name}: {reason}")

    # ---- where its layers are --------------------------------------------------------------------------
    def claims(self, prefix: str, names: set[str]) -> bool:
        """Whether the layer ``prefix`` is stored in this layout, from tensor names alone."""
        return f"{prefix}.{self.marker}" in names

    def layers(self, names: Iterable[str]) -> list[str]:
        """Sorted prefixes of the layers stored in this layout."""
        names = set(names)
        suffix = "." + self.marker
        return sorted(p for p in (n[: -len(suffix)] for n in names if n.endswith(suffix)) if self.claims(p, names))

    def parts(self, prefix: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """The layer's entries of this layout (full names), from a mapping of tensors or header metadata."""
        return {f"{prefix}.{leaf}": tensors[f"{prefix}.{leaf}"] for leaf in self.leaves
                if f"{prefix}.{leaf}" in tensors}

    def scale_of(self, prefix: str, tensors: Mapping[str, Tensor]) -> Tensor:
        """The layer's stored scales, oriented ``[out, groups]`` whatever the layout's own orientation."""
        if self.scale_leaf is None:
            raise CompressError(f"{self.name} layers have no scales")
        return tensors[f"{prefix}.{self.scale_leaf}"]

    # ---- the four jobs ---------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, weight: Tensor, scheme: QuantScheme | None, **qparams: Any) -> dict[str, Tensor]:
        """Checkpoint tensors ``{leaf: tensor}`` of a dense weight ``[out, in]``."""

    @abstractmethod
    def decode(self, prefix: str, tensors: Mapping[str, Tensor], scheme: QuantScheme | None,
               **options: Any) -> Tensor:
        """The dense weight ``[out, in]`` of layer ``prefix`` (validated; CompressError names the tensor).
        ``options``: model-level settings of the layout (``read_config``), e.g. GPTQ's checkpoint_format."""

    @abstractmethod
    def config(self, scheme: QuantScheme | None, **provenance: Any) -> dict[str, Any]:
        """This layout's part of ``quantization_config`` for layers of ``scheme``."""

    @abstractmethod
    def rebuild(self, prefix: str, tensors: Mapping[str, Tensor], scheme: QuantScheme | None,
                bias: Tensor | None, **options: Any) -> nn.Module:
        """The runnable module of layer ``prefix`` from its checkpoint tensors."""

    def read_config(self, quant_config: Mapping[str, Any]) -> tuple[QuantScheme, dict[str, Any]]:
        """(scheme, options) of a checkpoint whose ``quant_method`` is this layout's own (one scheme per
        model, as GPTQ); compressed-tensors layouts take their schemes from config groups instead."""
        raise CompressError(f"{self.name} layers take their scheme from a compressed-tensors config group")

    @abstractmethod
    def header_shape(self, prefix: str, meta: HeaderMeta, scheme: QuantScheme | None,
                     values: Mapping[str, list[int]]) -> tuple[int, int]:
        """``(out, in)`` of a layer from safetensors headers (``values``: small shape tensors' contents),
        every header checked against the scheme; CompressError names the first tensor that disagrees."""

    def stored_bits(self, prefix: str, meta: HeaderMeta) -> int:
        """Bits the layer's codes, scales, zeros and indices take on disk (shape records aside)."""
        skip = {f"{prefix}.{leaf}" for leaf in self.shape_leaves}
        return sum(math.prod(shape) * dtype_bits(dtype) for name, (dtype, shape) in self.parts(prefix, meta).items()
                   if name not in skip)


class StorageCodec(Codec):
    """A quantized layout held in memory as a typed ``WeightStorage`` inside a ``QuantLinear``."""

    storage_cls: ClassVar[type[WeightStorage]]

    @staticmethod
    def scheme_group(scheme: QuantScheme | None, *, actorder: str | None = None,
                     observer: str | None = "minmax") -> dict[str, Any]:
        """The config group of ``scheme`` without targets (the exporter adds them): what every
        quantized-weights layout writes as its ``config``."""
        assert scheme is not None
        group = scheme.to_config_group([], actorder=actorder, observer=observer or "minmax")
        group.pop("targets")
        return group

    def read(self, prefix: str, tensors: Mapping[str, Tensor], scheme: QuantScheme, **options: Any) -> WeightStorage:
        """The validated storage of layer ``prefix``."""
        self.check(scheme, f"layer {prefix}: ")
        return self.storage_cls.from_tensors(prefix, tensors, scheme)

    def decode(self, prefix: str, tensors: Mapping[str, Tensor], scheme: QuantScheme | None,
               **options: Any) -> Tensor:
        assert scheme is not None
        return self.read(prefix, tensors, scheme, **options).dequantize(torch.float32)

    def encode(self, weight: Tensor, scheme: QuantScheme | None, **qparams: Any) -> dict[str, Tensor]:
        assert scheme is not None
        storage = self.encode_storage(weight, scheme, **qparams)
        return {k.split(".", 1)[1]: v for k, v in storage.tensors("p").items()}

    @abstractmethod
    def encode_storage(self, weight: Tensor, scheme: QuantScheme, **qparams: Any) -> WeightStorage:
        """The typed storage of a dense weight (what ``encode`` writes and ``quantize_linear`` wraps)."""

    def rebuild(self, prefix: str, tensors: Mapping[str, Tensor], scheme: QuantScheme | None,
                bias: Tensor | None, **options: Any) -> nn.Module:
        assert scheme is not None
        return self.wrap(self.read(prefix, tensors, scheme, **options), bias)

    def wrap(self, storage: WeightStorage, bias: Tensor | None) -> QuantLinear:
        """The runnable layer holding ``storage`` (its ``format`` names this codec)."""
        return QuantLinear.from_storage(storage, bias, format=self.name)

    def quantize_linear(self, linear: nn.Linear, scheme: QuantScheme, **qparams: Any) -> QuantLinear:
        """``linear`` quantized in this layout (min-max qparams unless given)."""
        self.check(scheme)
        scheme.check_layer("linear", linear.in_features)
        storage = self.encode_storage(linear.weight.detach(), scheme, **qparams)
        return self.wrap(storage, None if linear.bias is None else linear.bias.detach())


CODECS: Registry[Codec] = Registry("codec")


def register(codec: Codec) -> Codec:
    """Make ``codec`` known under ``codec.name`` (registration order is the order of lookups)."""
    CODECS.register(codec.name)(codec)
    return codec


def all_codecs() -> list[Codec]:
    return [CODECS.get(n) for n in CODECS.names()]


_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}


def dtype_bits(dtype: str) -> int:
    """Bits per element of a safetensors header dtype (torch spellings too)."""
    key = str(dtype).upper().replace("TORCH.", "")
    aliases = {"FLOAT32": "F32", "FLOAT16": "F16", "BFLOAT16": "BF16", "INT32": "I32", "INT64": "I64", "INT8": "I8",
               "UINT8": "U8", "FLOAT8_E4M3FN": "F8_E4M3"}
    return _DTYPE_BITS.get(aliases.get(key, key), 32)


def header_fail(prefix: str, leaf: str, detail: str) -> CompressError:
    return CompressError(f"tensor {prefix}.{leaf} {detail}")


def expect_headers(prefix: str, meta: HeaderMeta, expected: Mapping[str, list[int]], what: str) -> None:
    """Each expected leaf present with its shape (header check shared by the layouts)."""
    for leaf, shape in expected.items():
        key = f"{prefix}.{leaf}"
        if key not in meta:
            raise header_fail(prefix, leaf, "is missing")
        if list(meta[key][1]) != list(shape):
            raise header_fail(prefix, leaf, f"has shape {list(meta[key][1])}, expected {list(shape)} for {what}")
