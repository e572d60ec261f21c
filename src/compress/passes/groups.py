"""What a group pass receives, and the one transform scaling methods share: ``x → (x·s) · (W/s)``.

A group is the set of linears that read one tensor, plus the module producing that tensor. Multiplying
the producer's output channels by ``s`` and every reader's input columns by ``1/s`` leaves the block's
function unchanged (exactly, up to rounding) while moving magnitude between activations and weights:
AWQ searches ``s`` to protect salient weight columns, SmoothQuant to flatten activation outliers. Both
then quantize the rescaled weights. The pipeline finds the producer (``compress.models.producers``);
these functions only touch tensors, so they hold for any family the table or the fallback resolves.

Why the producer kinds are safe to scale: a norm computes ``normalize(x) · weight (+ bias)``, so scaling
its weight and bias scales its output; a linear's output channel ``j`` is row ``j`` of its weight (plus
bias ``j``), and the table lists a previous linear only where the path to the readers is linear per
channel (attention mixes tokens, not the channels of V), a product with another branch (``act(gate) · up``),
or positively homogeneous (ReLU, for ``s > 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from compress.core.errors import CompressError


@dataclass(frozen=True)
class Producer:
    """The module whose output is a group's input."""

    name: str
    module: nn.Module
    kind: Literal["norm", "linear"]
    rows: tuple[int, int] | None = None
    """For a linear: the output rows ``[start, stop)`` that are the group's input (a fused q/k/v layer's
    v part); None: all of them."""

    @property
    def channels(self) -> int:
        start, stop = self.rows if self.rows is not None else (0, _weight(self).shape[0])
        return stop - start

    def scale_output_(self, scale: Tensor) -> None:
        """Multiply the output channels feeding the group by ``scale`` (``[channels]``), in place."""
        weight = _weight(self)
        start, stop = self.rows if self.rows is not None else (0, weight.shape[0])
        if scale.shape != (stop - start,):
            raise CompressError(f"a scale of shape {list(scale.shape)} does not fit the {stop - start} output "
                                f"channels of {self.name}")
        bias = getattr(self.module, "bias", None)
        with torch.no_grad():
            s = scale.to(device=weight.device, dtype=torch.float32)
            if self.kind == "linear":
                weight[start:stop].copy_((weight[start:stop].float() * s[:, None]).to(weight.dtype))
            else:
                weight.copy_((weight.float() * s).to(weight.dtype))
            if isinstance(bias, Tensor):
                bias[start:stop].copy_((bias[start:stop].float() * s).to(bias.dtype))


def _weight(producer: Producer) -> Tensor:
    weight = getattr(producer.module, "weight", None)
    if not isinstance(weight, Tensor) or weight.is_meta:
        raise CompressError(f"{producer.name} ({type(producer.module).__name__}) has no dense weight to fold a "
                            "transform into; a layer is rewritten before it is quantized, so order the stages so")
    return weight.data


@dataclass(frozen=True)
class Group:
    """The layers of one block that read the same input tensor, in call order, and who produces it."""

    names: tuple[str, ...]
    layers: tuple[nn.Linear, ...]
    producer: Producer | None
    """None only for a pass with ``needs_producer = False``: nothing foldable produces this input."""

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features


def scale_inputs_(layers: tuple[nn.Linear, ...] | list[nn.Linear], scale: Tensor) -> None:
    """Multiply every layer's input columns by ``scale`` (``[in_features]``), in place."""
    for layer in layers:
        if not isinstance(layer, nn.Linear):
            raise CompressError(f"a {type(layer).__name__} has no dense weight to rescale; rewrite layers "
                                "before they are quantized")
        with torch.no_grad():
            w = layer.weight.data
            w.copy_((w.float() * scale.to(device=w.device, dtype=torch.float32)).to(w.dtype))


def fold_scale_(group: Group, scale: Tensor) -> None:
    """The function-preserving rescale: producer output ``· scale``, reader inputs ``· 1/scale``."""
    if group.producer is None:
        raise CompressError(f"{group.names[0]} has no producer to fold a scale into")
    if (scale <= 0).any():
        raise CompressError("scales folded into a producer must be positive (ReLU is homogeneous only for s > 0)")
    group.producer.scale_output_(scale)
    scale_inputs_(group.layers, scale.reciprocal())
