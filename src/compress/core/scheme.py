"""Quantization schemes: what a quantized weight means, independent of how it was computed.

A ``QuantScheme`` is the single description that the passes, the packer, the kernels and the exporter
agree on. It maps one-to-one onto the ``weights`` block of a compressed-tensors ``config_groups`` entry
(FORMATS.md), so the exporter never has to translate and a checkpoint we wrote can be read back into
the same scheme.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from compress.core.errors import CompressError

SUPPORTED_BITS = (2, 3, 4, 8)
_ACTORDERS = (None, "group", "weight", "static", "dynamic")


@dataclass(frozen=True)
class QuantScheme:
    """Integer weight quantization in the signed code space of compressed-tensors.

    ``group_size == -1`` means one scale per output channel (compressed-tensors strategy "channel");
    a positive value means one scale per ``group_size`` consecutive input columns (strategy "group").
    Validation is explicit (``validate``) rather than in ``__post_init__`` so a recipe can build a
    scheme from user input and report the problem in its own words.
    """

    bits: int
    group_size: int
    symmetric: bool = True

    def validate(self) -> None:
        """Raise CompressError (one sentence) for a bit width or group size we cannot store."""
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise CompressError(
                f"unsupported bit width {self.bits!r}; supported widths are {', '.join(map(str, SUPPORTED_BITS))}"
            )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise CompressError(f"group size must be an integer, got {self.group_size!r}")
        if self.group_size != -1 and self.group_size <= 0:
            raise CompressError(
                f"unsupported group size {self.group_size}; use -1 (per output channel) or a positive integer"
            )
        if not isinstance(self.symmetric, bool):
            raise CompressError(f"symmetric must be true or false, got {self.symmetric!r}")

    @property
    def per_channel(self) -> bool:
        """True when there is a single group spanning all input columns."""
        return self.group_size == -1

    def effective_group_size(self, in_features: int) -> int:
        """Columns per group for a layer: ``in_features`` when per-channel."""
        return in_features if self.per_channel else self.group_size

    def n_groups(self, in_features: int) -> int:
        """Number of scale columns for a layer with ``in_features`` inputs (ceil, as compressed-tensors)."""
        if self.per_channel:
            return 1
        return math.ceil(in_features / self.group_size)

    def check_layer(self, name: str, in_features: int) -> None:
        """Refuse a layer whose input width is not a whole number of groups (readers reshape by group)."""
        if not self.per_channel and in_features % self.group_size != 0:
            raise CompressError(
                f"layer {name} has {in_features} input features, not divisible by group size {self.group_size}"
            )

    @property
    def qmin(self) -> int:
        """Smallest signed code: -2^(b-1)."""
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Largest signed code: 2^(b-1) - 1."""
        return (1 << (self.bits - 1)) - 1

    @property
    def tag(self) -> str:
        """Short name used in output folder names: ``w4g128``, ``w8`` (per-channel), ``w4g128a`` (asym)."""
        group = "" if self.per_channel else f"g{self.group_size}"
        return f"w{self.bits}{group}{'' if self.symmetric else 'a'}"

    def to_compressed_tensors(self, actorder: str | None = None, observer: str = "minmax") -> dict[str, Any]:
        """The ``weights`` dict of a compressed-tensors config group (FORMATS.md).

        Per-channel is written as strategy "channel" with ``group_size: null`` (what llm-compressor's
        W8A16 preset writes); the installed compressed-tensors also accepts -1 but older readers do not.
        """
        if actorder not in _ACTORDERS:
            raise CompressError(f"unsupported activation ordering {actorder!r}; use group, weight or none")
        return {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": self.symmetric,
            "strategy": "channel" if self.per_channel else "group",
            "group_size": None if self.per_channel else self.group_size,
            "dynamic": False,
            "actorder": actorder,
            "observer": observer,
            "observer_kwargs": {},
            "block_structure": None,
        }

    @classmethod
    def from_compressed_tensors(cls, d: dict[str, Any]) -> QuantScheme:
        """Read the ``weights`` dict of a config group back; CompressError for anything we cannot serve."""
        if not isinstance(d, dict):
            raise CompressError(f"quantization weights config must be a mapping, got {type(d).__name__}")
        qtype = str(d.get("type", "int")).lower()
        if qtype != "int":
            raise CompressError(f"unsupported weight quantization type {qtype!r}; only int is supported")
        if d.get("dynamic", False):
            raise CompressError("dynamic weight quantization is not supported")
        if d.get("block_structure") is not None:
            raise CompressError("block-wise weight quantization is not supported")
        bits = d.get("num_bits", 8)
        group_size = d.get("group_size")
        strategy = d.get("strategy")
        strategy = str(strategy).lower() if strategy is not None else None
        if strategy is None:
            strategy = "channel" if group_size in (None, -1) else "group"
        if strategy == "channel":
            if group_size not in (None, -1):
                raise CompressError(f"strategy channel does not take group size {group_size}")
            group_size = -1
        elif strategy == "group":
            if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
                raise CompressError(f"strategy group needs a positive group size, got {group_size!r}")
        else:
            raise CompressError(
                f"unsupported weight quantization strategy {strategy!r}; use group or channel"
            )
        symmetric = d.get("symmetric", True)
        scheme = cls(bits=bits, group_size=group_size, symmetric=symmetric)
        scheme.validate()
        return scheme
