"""``WeightStorage``: the checkpoint tensors of ONE quantized Linear together with the scheme that gives them
meaning: the typed object the codecs produce, ``QuantLinear`` holds and the kernels compute from.

Why one type with the scheme inside: the facts a kernel needs (bits, group size, symmetry, scale dtype,
shape, device) were re-derived from loose scalars in every file; a storage object carries them once.
Each layout (``core/packing.py`` pack-quantized, ``core/unpacked.py`` int8/FP8 codes as they are) is a
dataclass whose tensor fields are named exactly like the checkpoint entries, so ``tensors(prefix)`` is the
checkpoint and a module's buffers can be the fields themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import fields
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

from compress.core.scheme import QuantScheme

S = TypeVar("S", bound="WeightStorage")


class WeightStorage(ABC):
    """Per-layer quantized tensors (dataclass fields named like the checkpoint) plus ``scheme``."""

    TENSOR_FIELDS: ClassVar[tuple[str, ...]]
    """Every tensor field, present or optional, in checkpoint order."""
    PERSISTENT: ClassVar[frozenset[str]]
    """The fields that are checkpoint entries (others, such as a derived shape, are kept in memory only)."""
    scheme: QuantScheme

    @property
    @abstractmethod
    def out_features(self) -> int: ...

    @property
    @abstractmethod
    def in_features(self) -> int: ...

    @property
    @abstractmethod
    def scale(self) -> Tensor:
        """The stored scale tensor (its dtype is the layer's scale dtype)."""

    @property
    def device(self) -> torch.device:
        return self.scale.device

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.scale.dtype

    def named_tensors(self) -> dict[str, Tensor]:
        """Field name → tensor for every field that is set (optional ones may be None)."""
        return {n: getattr(self, n) for n in self.TENSOR_FIELDS if getattr(self, n) is not None}

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """Checkpoint entries under ``prefix`` (only the persistent tensors that exist for this scheme)."""
        return {f"{prefix}.{n}": t for n, t in self.named_tensors().items() if n in self.PERSISTENT}

    @classmethod
    def from_fields(cls: type[S], scheme: QuantScheme, values: Mapping[str, Tensor | None]) -> S:
        """Rebuild from already-validated tensors (a module's buffers): no checks, no copies."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(scheme=scheme, **{n: values.get(n) for n in cls.TENSOR_FIELDS if n in names})

    @classmethod
    @abstractmethod
    def empty(cls: type[S], out_features: int, in_features: int, scheme: QuantScheme, *,
              scale_dtype: torch.dtype, has_g_idx: bool = False, device: torch.device | str | None = None) -> S:
        """Zeroed tensors of the checkpoint shapes, ready to be loaded into."""

    @classmethod
    @abstractmethod
    def from_tensors(cls: type[S], prefix: str, tensors: Mapping[str, Tensor], scheme: QuantScheme) -> S:
        """Read and validate a layer's checkpoint entries; CompressError naming the first tensor that is wrong."""

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight ``[out, in]`` a reader reconstructs."""
