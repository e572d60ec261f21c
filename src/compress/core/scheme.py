"""Quantization schemes: what a quantized layer means, independent of how it was computed or stored.

A ``QuantScheme`` is a compressed-tensors config group without its targets: ``weights`` and
``input_activations`` args (``core/qargs.py``), each optional. It is the single description the passes,
the codecs, the kernels and the exporter agree on, and it reads from / writes to the config-group dict
unchanged (``from_config_group`` / ``to_config_group``), so a checkpoint we wrote reads back into the
same scheme. Which storage layout holds the tensors is a codec's business (``compress.codecs``), not the
scheme's: the same W8 scheme can be ``pack-quantized`` or ``naive-quantized``.

``QuantScheme(bits, group_size, symmetric)`` keeps meaning integer weight-only quantization (W4A16 etc.),
the form every pass produces today; the int properties (``bits``, ``group_size``, ``qmin``, ...) read the
weight args so the integer math (``core/primitives.py``) takes a scheme as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from compress.core.errors import CompressError
from compress.core.qargs import ACTORDERS, SUPPORTED_BITS, QuantArgs

__all__ = ["SCHEMES", "SUPPORTED_BITS", "QuantArgs", "QuantScheme"]


@dataclass(frozen=True, init=False)
class QuantScheme:
    """``weights`` and ``input_activations`` quantization of a layer (either may be None).

    Validation is explicit (``validate``) rather than in the constructor so a recipe can build a scheme
    from user input and report the problem in its own words.
    """

    weights: QuantArgs | None
    input_activations: QuantArgs | None

    def __init__(self, bits: int | None = None, group_size: int | None = None, symmetric: bool = True, *,
                 weights: QuantArgs | None = None, input_activations: QuantArgs | None = None) -> None:
        if bits is not None or group_size is not None:
            if weights is not None:
                raise TypeError("give either bits/group_size or weights, not both")
            if bits is None or group_size is None:
                raise TypeError("QuantScheme(bits, group_size) needs both")
            weights = QuantArgs.int_weights(bits, group_size, symmetric)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "input_activations", input_activations)

    @classmethod
    def w8a8_int8(cls) -> QuantScheme:
        """W8A8-int8, compressed-tensors' ``W8A8`` preset: int8 symmetric per-channel weights, int8 symmetric
        per-token dynamic input activations (no activation calibration)."""
        return cls(weights=QuantArgs.int_weights(8, -1, True), input_activations=QuantArgs.int8_per_token())

    @classmethod
    def w4a8(cls, group_size: int = 128) -> QuantScheme:
        """W4A8, compressed-tensors' ``W4A8`` preset: int4 symmetric weights in groups of ``group_size`` (128
        there; -1 per channel), int8 symmetric per-token dynamic input activations; stored ``pack-quantized``."""
        return cls(weights=QuantArgs.int_weights(4, group_size, True), input_activations=QuantArgs.int8_per_token())

    @classmethod
    def fp8(cls) -> QuantScheme:
        """W8A16-FP8: e4m3 symmetric per-channel weights, float activations (compressed-tensors' FP8 weight-only
        args: ``num_bits 8, type float, strategy channel, symmetric``), stored ``float-quantized``."""
        return cls(weights=QuantArgs.fp8_weights("channel"))

    @classmethod
    def w8a8_fp8(cls, static: bool = False) -> QuantScheme:
        """W8A8-FP8: e4m3 per-channel weights and e4m3 input activations, per token at run time (``FP8_DYNAMIC``,
        the default) or, ``static``, one calibrated per-tensor scale per layer (the ``FP8`` preset's inputs)."""
        inputs = QuantArgs.fp8_per_tensor_static() if static else QuantArgs.fp8_per_token()
        return cls(weights=QuantArgs.fp8_weights("channel"), input_activations=inputs)

    @property
    def has_static_inputs(self) -> bool:
        """Input activations with a calibrated (stored) scale rather than one computed at run time."""
        return self.input_activations is not None and not self.input_activations.dynamic

    @property
    def weight_only(self) -> QuantScheme:
        """The same weights without activation quantization (what the weight-side integer math reads)."""
        return QuantScheme(weights=self.weights)

    def validate(self) -> None:
        """Raise CompressError (one sentence) for a scheme we cannot represent."""
        if self.weights is None and self.input_activations is None:
            raise CompressError("a quantization scheme needs weights or input_activations")
        if self.weights is not None:
            self.weights.validate("weight")
            if self.weights.dynamic:
                raise CompressError("dynamic weight quantization is not supported")
            if self.weights.strategy == "token":
                raise CompressError("weights cannot be quantized per token")
        if self.input_activations is not None:
            self.input_activations.validate("input activation")
            if self.input_activations.actorder is not None:
                raise CompressError("activation ordering applies to weights, not to input activations")

    # ---- the weight args, as the integer math reads them ------------------------------------------------
    @property
    def w(self) -> QuantArgs:
        """The weight args; CompressError for an activation-only scheme."""
        if self.weights is None:
            raise CompressError("this quantization scheme has no weights")
        return self.weights

    @property
    def bits(self) -> int:
        return self.w.num_bits

    @property
    def symmetric(self) -> bool:
        return self.w.symmetric

    @property
    def is_int(self) -> bool:
        return self.w.type == "int"

    @property
    def group_size(self) -> int:
        """Positive columns per scale, or -1 per output channel (our historic spelling).

        Per-tensor and per-token scales have no such number: the integer group math refuses them here,
        in one sentence, instead of treating them as per-channel."""
        w = self.w
        if w.strategy == "group":
            return w.group_size  # type: ignore[return-value]
        if w.strategy == "channel":
            return -1
        raise CompressError(f"weight strategy {w.strategy} has no group size (only group or channel do)")

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
        if self.weights is not None and self.weights.strategy == "group" and in_features % self.group_size:
            raise CompressError(
                f"layer {name} has {in_features} input features, not divisible by group size {self.group_size}"
            )

    @property
    def qmin(self) -> int:
        """Smallest signed code: -2^(b-1)."""
        return self.w.qmin

    @property
    def qmax(self) -> int:
        """Largest signed code: 2^(b-1) - 1."""
        return self.w.qmax

    @property
    def tag(self) -> str:
        """Short name used in output folder names and reports: ``w4g128``, ``w8`` (per-channel), ``w4g128a``
        (asymmetric), ``wfp8`` (FP8 per channel), ``w8a8d`` (dynamic 8-bit input activations), ``w4g128a8d``
        (W4A8), ``wfp8afp8d`` (W8A8-FP8, per-token dynamic inputs), ``wfp8afp8t`` (W8A8-FP8, one static input
        scale per tensor)."""
        parts = []
        if self.weights is not None:
            parts.append(f"w{self.weights.tag}")
        if self.input_activations is not None:
            parts.append(f"a{self.input_activations.tag}")
        return "".join(parts)

    # ---- compressed-tensors round trip ------------------------------------------------------------------
    def to_config_group(self, targets: list[str], *, actorder: str | None = None, observer: str | None = None,
                        format: str | None = None) -> dict[str, Any]:
        """A compressed-tensors config group. ``actorder`` / ``observer`` (how the weight scales were chosen)
        override the weight args' own; ``format`` is written only for a group of a mixed-format model."""
        group: dict[str, Any] = {
            "targets": list(targets),
            "weights": None if self.weights is None else self._weights_with(actorder, observer).to_dict(),
            "input_activations": None if self.input_activations is None else self.input_activations.to_dict(),
            "output_activations": None,
        }
        if format is not None:
            group["format"] = format
        return group

    @classmethod
    def from_config_group(cls, group: Any) -> QuantScheme:
        """The scheme of a config group (its ``targets`` and ``format`` are the caller's business)."""
        if not isinstance(group, dict):
            raise CompressError(f"a quantization config group must be a mapping, got {type(group).__name__}")
        if group.get("output_activations") is not None:
            raise CompressError("output activation quantization is not supported")
        weights, inputs = group.get("weights"), group.get("input_activations")
        scheme = cls(weights=None if weights is None else QuantArgs.from_dict(weights, "weight"),
                     input_activations=None if inputs is None else QuantArgs.from_dict(inputs, "input activation"))
        scheme.validate()
        return scheme

    def to_compressed_tensors(self, actorder: str | None = None, observer: str = "minmax") -> dict[str, Any]:
        """The ``weights`` dict of a compressed-tensors config group (FORMATS.md)."""
        return self._weights_with(actorder, observer).to_dict()

    @classmethod
    def from_compressed_tensors(cls, d: dict[str, Any]) -> QuantScheme:
        """A weight-only scheme from the ``weights`` dict of a config group; CompressError for what we cannot
        represent (whether a codec serves it is checked where the layer is read)."""
        scheme = cls(weights=QuantArgs.from_dict(d, "weight"))
        scheme.validate()
        return scheme

    def _weights_with(self, actorder: str | None, observer: str | None) -> QuantArgs:
        if actorder not in ACTORDERS:
            raise CompressError(f"unsupported activation ordering {actorder!r}; use group, weight or none")
        w = self.w
        return replace(w, actorder=actorder if actorder is not None else w.actorder,
                       observer=observer if observer is not None else w.observer)


SCHEMES = {"w8a8-int8": QuantScheme.w8a8_int8, "w4a8": QuantScheme.w4a8, "fp8": QuantScheme.fp8, "w8a8-fp8": QuantScheme.w8a8_fp8,
           "w8a8-fp8-static": lambda: QuantScheme.w8a8_fp8(static=True)}
"""Named schemes (``compress quantize --scheme NAME``, a quantize stage's ``scheme`` field)."""
