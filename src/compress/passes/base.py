"""What a compression method is to the pipeline: a config class plus a per-layer solve.

A pass sees ``nn.Linear`` modules and tensors, never an architecture. The pipeline (``compress.pipeline``)
walks the blocks, feeds each targeted layer's statistics when the pass asks for calibration, and swaps in
whatever module ``apply`` returns (a ``QuantLinear``, a pruned ``Linear``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor, nn

from compress.core.errors import CompressError
from compress.core.registry import Registry
from compress.core.targets import check_patterns


class PassConfig(BaseModel):
    """Base of every stage's config. Unknown keys are rejected so typos in recipes fail loudly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    ignore: list[str] = ["lm_head"]
    """Module name patterns left untouched (glob, or ``re:`` regex as in compressed-tensors)."""

    @field_validator("ignore")
    @classmethod
    def _ignore_compiles(cls, value: list[str]) -> list[str]:
        """A ``re:`` pattern that does not compile is refused when the recipe is built (``--dry-run`` too),
        for every method, structured ones included."""
        try:
            return check_patterns(value)
        except CompressError as error:
            raise ValueError(str(error)) from None


class Stats(Protocol):
    """A per-layer accumulator the pipeline feeds (``calibrate.stats.HessianStats`` is one).

    The pipeline only needs these two methods, so a pass may bring any statistic it likes.
    """

    def add_batch(self, x: Tensor) -> None:
        """Fold one calibration batch of the layer's INPUT (``[..., in_features]``) into the statistic."""

    def free(self) -> None:
        """Release the memory once ``apply`` has run."""


class LayerPass(ABC):
    """One method applied layer by layer. Subclasses set ``config_cls`` and implement ``apply``."""

    config_cls: ClassVar[type[PassConfig]]
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    def make_stats(self, name: str, linear: nn.Linear) -> Stats | None:
        """The accumulator for one targeted layer, when ``needs_calibration`` is True.

        Contract with the pipeline: it calls this for each targeted layer, feeds every calibration batch's
        layer input through ``stats.add_batch(x)`` (a forward hook), then ``apply(name, linear, stats)``,
        then ``stats.free()``. The pass decides what to collect, so a new statistic needs no pipeline change.
        """
        return None

    def check_layer(self, name: str, linear: nn.Linear) -> None:  # noqa: B027 (optional hook)
        """Raise ``CompressError`` before any work if this layer cannot take the pass (e.g. group size)."""

    @abstractmethod
    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        """Return the module that replaces ``linear`` (may be ``linear`` itself, modified)."""

    def describe(self) -> str:
        """A short tag for output names and summaries, e.g. ``w4g128``."""
        return self.config.method

    # Capabilities, read by the stage-order check (``compress.pipeline.stage_order``) before anything loads.
    needs_dense_weights: ClassVar[bool] = True
    """The pass reads and rewrites an ``nn.Linear``'s float weight, so it cannot follow a stage that left
    the layer quantized (packed codes have no ``weight`` to rewrite)."""

    def quantizes(self) -> bool:
        """Whether the layers this stage touches come out quantized (packed) rather than dense."""
        return False


class ModelPass(ABC):
    """A method that changes the model's shape (structured pruning): it edits whole blocks and the config, so
    it cannot be a per-layer solve inside the block sweep.

    It still never sees an architecture: ``compress.models.structure`` names the layers (MLP in/out, q/k/v/o)
    and edits the config; the pass turns calibration statistics into what to keep and slices ``nn.Linear``s.
    The pipeline (``compress.pipeline.structured``) runs it before any layer-wise stage.
    """

    config_cls: ClassVar[type[PassConfig]]
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    def describe(self) -> str:
        """A short tag for output names and summaries, e.g. ``channels25``."""
        return self.config.method


PASSES: Registry[type[LayerPass] | type[ModelPass]] = Registry("method")
