"""Quantization args: how ONE tensor (a weight, or a layer's input activations) is quantized.

``QuantArgs`` mirrors compressed-tensors' ``QuantizationArgs`` field for field (``quantization/quant_args.py``
in the installed package), so a ``weights`` / ``input_activations`` block of a config group reads into it
and writes back unchanged (``from_dict`` / ``to_dict``). Only what a checkpoint needs to be read is kept;
``scale_dtype`` / ``zp_dtype`` are left to the stored tensors (FORMATS.md: optional newer fields broke older
readers, so we never write them), ``observer_kwargs`` are calibration settings and are written empty.

Validation here is *structural* (does this describe something at all, in our words); whether a codec can
store it and a kernel can run it is the codec's question (``compress.codecs``), so an unservable
checkpoint is refused with a sentence naming what is missing, not a parse error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compress.core.errors import CompressError

SUPPORTED_BITS = (2, 3, 4, 8)
"""Integer widths we quantize to and store."""
FLOAT_BITS = (8,)
"""Float widths we store (FP8 e4m3); FP4/FP6 need their own packing, not written today."""
TYPES = ("int", "float")
STRATEGIES = ("tensor", "channel", "group", "token")
ACTORDERS = (None, "weight", "group")
_ACTORDER_ALIASES = {"static": "weight", "dynamic": "group"}


@dataclass(frozen=True)
class QuantArgs:
    """One tensor's quantization: code type and width, scale granularity, symmetry, static or dynamic.

    ``strategy``: ``tensor`` (one scale), ``channel`` (one per output row), ``group`` (one per
    ``group_size`` input columns of a row), ``token`` (one per activation row, dynamic only).

    ``actorder`` and ``observer`` record how the scales were *chosen* (compressed-tensors keeps them in the
    same block); they do not change what the stored tensors mean, so they take no part in equality or
    hashing: two layers quantized alike but with different observers hold the same kind of tensors.
    """

    num_bits: int = 8
    type: str = "int"
    strategy: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool = False
    actorder: str | None = field(default=None, compare=False)
    observer: str | None = field(default=None, compare=False)

    @classmethod
    def int_weights(cls, bits: int, group_size: int, symmetric: bool = True) -> QuantArgs:
        """Our historic spelling: ``group_size == -1`` per output channel, a positive size per group.

        Stores the values as given (``validate`` words the problem), so a recipe's bad input is reported
        in terms of bits and group size rather than a strategy the user never wrote."""
        per_channel = group_size == -1
        return cls(num_bits=bits, type="int", strategy="channel" if per_channel else "group",
                   group_size=None if per_channel else group_size, symmetric=symmetric)

    @classmethod
    def int8_per_token(cls) -> QuantArgs:
        """Input activations of W8A8-int8 and W4A8: int8 symmetric, one scale per token computed at run time
        (what compressed-tensors' ``W8A8`` and ``W4A8`` presets write as ``input_activations``)."""
        return cls(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)

    @property
    def is_int8_per_token(self) -> bool:
        """Whether these are the input args of W8A8-int8 and W4A8 (``int8_per_token``); observer and actorder
        take no part, as in equality, so args read back from any producer's config compare alike."""
        return self == QuantArgs.int8_per_token()

    @classmethod
    def fp8_weights(cls, strategy: str = "channel") -> QuantArgs:
        """FP8 (e4m3) symmetric weights, one scale per output channel (compressed-tensors' ``FP8_DYNAMIC``
        weights) or per tensor (its ``FP8`` preset)."""
        return cls(num_bits=8, type="float", strategy=strategy, symmetric=True)

    @classmethod
    def fp8_per_token(cls) -> QuantArgs:
        """Input activations of W8A8-FP8 dynamic (``FP8_DYNAMIC``): e4m3, one scale per token at run time."""
        return cls(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)

    @classmethod
    def fp8_per_tensor_static(cls) -> QuantArgs:
        """Input activations of W8A8-FP8 static (the ``FP8`` preset's): e4m3, one calibrated scale per layer
        (``P.input_scale``), chosen from the largest calibration ``|x|`` (compressed-tensors' ``static_minmax``)."""
        return cls(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False,
                   observer="static_minmax")

    # ---- structural validation -------------------------------------------------------------------------
    def validate(self, role: str = "weight") -> None:
        """Raise CompressError (one sentence) for args that describe nothing we can represent."""
        if self.type not in TYPES:
            raise CompressError(f"unsupported {role} quantization type {self.type!r}; use int or float")
        widths = SUPPORTED_BITS if self.type == "int" else FLOAT_BITS
        if isinstance(self.num_bits, bool) or self.num_bits not in widths:
            kind = "bit width" if self.type == "int" else "float bit width"
            raise CompressError(
                f"unsupported {kind} {self.num_bits!r}; supported widths are {', '.join(map(str, widths))}"
            )
        if self.strategy not in STRATEGIES:
            raise CompressError(
                f"unsupported {role} quantization strategy {self.strategy!r}; use {', '.join(STRATEGIES)}"
            )
        if self.strategy == "group":
            if self.group_size is None:
                raise CompressError("strategy group needs a positive group size, got None")
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise CompressError(f"group size must be an integer, got {self.group_size!r}")
            if self.group_size <= 0:
                raise CompressError(
                    f"unsupported group size {self.group_size}; use -1 (per output channel) or a positive integer"
                )
        elif self.group_size not in (None, -1):
            raise CompressError(f"strategy {self.strategy} does not take group size {self.group_size}")
        if self.strategy == "token" and not self.dynamic:
            raise CompressError("token quantization is computed per input row at run time, so it must be dynamic")
        if not isinstance(self.symmetric, bool):
            raise CompressError(f"symmetric must be true or false, got {self.symmetric!r}")
        if self.actorder not in ACTORDERS:
            raise CompressError(f"unsupported activation ordering {self.actorder!r}; use group, weight or none")

    # ---- derived facts ---------------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        """Smallest signed integer code: -2^(b-1)."""
        return -(1 << (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        """Largest signed integer code: 2^(b-1) - 1."""
        return (1 << (self.num_bits - 1)) - 1

    @property
    def tag(self) -> str:
        """``4g128`` (int, grouped), ``8`` (int per channel), ``fp8`` / ``fp8t`` (float per channel / tensor),
        ``a`` appended when asymmetric, ``d`` when dynamic."""
        if self.type == "float":
            core = f"fp{self.num_bits}{'t' if self.strategy == 'tensor' else ''}"
        else:
            core = f"{self.num_bits}{f'g{self.group_size}' if self.strategy == 'group' else ''}"
            core += "t" if self.strategy == "tensor" else ""
        return core + ("" if self.symmetric else "a") + ("d" if self.dynamic else "")

    # ---- compressed-tensors dict round trip ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The block exactly as compressed-tensors names it (and as FORMATS.md shows it).

        Per-channel is written as strategy "channel" with ``group_size: null`` (what llm-compressor's W8A16
        preset writes); the installed compressed-tensors also accepts -1 but older readers do not."""
        return {
            "num_bits": self.num_bits,
            "type": self.type,
            "symmetric": self.symmetric,
            "strategy": self.strategy,
            "group_size": self.group_size if self.strategy == "group" else None,
            "dynamic": self.dynamic,
            "actorder": self.actorder,
            "observer": self.observer,
            "observer_kwargs": {},
            "block_structure": None,
        }

    @classmethod
    def from_dict(cls, d: Any, role: str = "weight") -> QuantArgs:
        """Read a block back (defaults and strategy inference as compressed-tensors); CompressError when it
        describes something we cannot represent."""
        if not isinstance(d, dict):
            raise CompressError(f"quantization {role}s config must be a mapping, got {type(d).__name__}")
        if d.get("block_structure") is not None or str(d.get("strategy")).lower() == "block":
            raise CompressError(f"block-wise {role} quantization is not supported")
        dynamic = d.get("dynamic", False)
        if isinstance(dynamic, str):  # "local": tensor_group (NVFP4) only
            raise CompressError(f"{role} quantization with dynamic {dynamic!r} is not supported")
        group_size = d.get("group_size")
        strategy = d.get("strategy")
        if strategy is None:  # compressed-tensors' inference
            strategy = "tensor" if group_size is None else "channel" if group_size == -1 else "group"
        strategy = str(strategy).lower()
        if strategy in ("channel", "tensor", "token") and group_size == -1:
            group_size = None
        actorder = d.get("actorder")
        if actorder is False:
            actorder = None
        if isinstance(actorder, str):
            actorder = _ACTORDER_ALIASES.get(actorder.lower(), actorder.lower())
        args = cls(
            num_bits=d.get("num_bits", 8),
            type=str(d.get("type", "int")).lower(),
            strategy=strategy,
            group_size=group_size,
            symmetric=d.get("symmetric", True),
            dynamic=bool(dynamic),
            actorder=actorder,
            observer=d.get("observer"),
        )
        args.validate(role)
        return args
