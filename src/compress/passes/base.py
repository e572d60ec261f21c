"""What a compression method is to the pipeline: a config class plus a solve at the scope it needs.

A pass sees ``nn.Linear`` modules and tensors, never an architecture. The block sweep
(``compress.pipeline.sequential``) walks the blocks, feeds the statistics a pass asks for, calls its solve
and swaps in whatever modules it returns. Three scopes, because methods differ in what one solve must see:

- ``LayerPass.apply(name, linear, stats)``: one layer (RTN, GPTQ, magnitude, Wanda, SparseGPT).
- ``GroupPass.apply_group(group, stats)``: the layers that read one input tensor together with the module
  that produces it (a norm, or a previous linear), so a scaling, smoothing or rotation method (AWQ,
  SmoothQuant) can fold its transform into the producer (``compress.passes.groups``).
- ``BlockPass.apply_block(work)``: a whole block with its calibration inputs and its original outputs, for
  block-output reconstruction (AutoRound-like).

``ModelPass`` changes the model's shape (structured pruning); the pipeline drives it through the same
sweep, with the family layouts of ``compress.models.structure`` naming the layers it slices.

A ``cache`` pass (``kv_cache``) touches no linear: it calibrates how each attention quantizes its KV cache,
driven by ``compress.pipeline.kv_cache_step``, as a recipe's last stage.

``TransformPass`` changes the model's basis without changing its function (QuaRot-style rotations of the
residual stream): data-free, over every block and the embedding and head, before the layer-wise stages
quantize what it rotated; ``compress.models.rotation`` names the modules it is handed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor, nn

from compress.core.errors import CompressError
from compress.core.records import LayerRecord
from compress.core.registry import Registry
from compress.core.targets import check_patterns
from compress.kernels.quant_linear import QuantLinear

if TYPE_CHECKING:
    from compress.passes.groups import Group

Scope = Literal["layer", "group", "block", "model", "transform", "cache"]


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

    The pipeline only needs these two methods, so a pass may bring any statistic it likes. An optional
    ``share_key()`` lets layers that read one tensor share one accumulator (equal keys, same numbers).
    """

    def add_batch(self, x: Tensor) -> None:
        """Fold one calibration batch of the layer's INPUT (``[..., in_features]``) into the statistic."""

    def free(self) -> None:
        """Release the memory once the solve has run."""


class Pass(ABC):
    """What every method shares: its config, a tag, and the capabilities the stage-order check reads
    (``compress.pipeline.stage_order``) before anything loads."""

    config_cls: ClassVar[type[PassConfig]]
    scope: ClassVar[Scope]
    needs_calibration: ClassVar[bool] = False

    needs_dense_weights: ClassVar[bool] = True
    """The pass reads and rewrites an ``nn.Linear``'s float weight, so it cannot follow a stage that left
    the layer quantized (packed codes have no ``weight`` to rewrite)."""
    changes_shapes: ClassVar[bool] = False
    """The pass removes channels, heads or blocks: later stages must see the smaller model, so it runs in a
    sweep of its own and only before layer-wise stages (their layers would otherwise change under them)."""
    takes_stage_flags: ClassVar[bool] = True
    """The command line's stage flags (``--method``, ``--bits``, ``--ignore``, ...) address this stage. False
    for a transform stage that has none of those fields (a rotation): the flags then pass it by, so
    ``--rotate hadamard --method rtn`` leaves the rotation a rotation (``compress.recipes.flags``)."""
    rewrites_producers: ClassVar[bool] = False
    """Besides its own layers the pass edits the modules producing their input (a group pass folding a
    scale into a norm or a previous linear): those must still be dense too."""

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    def quantizes(self) -> bool:
        """Whether the layers this stage touches come out quantized (packed) rather than dense."""
        return False

    def describe(self) -> str:
        """A short tag for output names and summaries, e.g. ``w4g128``."""
        return self.config.method

    def make_stats(self, name: str, linear: nn.Linear) -> Stats | None:
        """The accumulator for one targeted layer, when ``needs_calibration`` is True.

        Contract with the pipeline: it calls this for each targeted layer, feeds every calibration batch's
        layer input through ``stats.add_batch(x)`` (a forward pre-hook), then the solve, then ``stats.free()``.
        The pass decides what to collect, so a new statistic needs no pipeline change.
        """
        return None

    def check_layer(self, name: str, linear: nn.Linear) -> None:  # noqa: B027 (optional hook)
        """Raise ``CompressError`` before any work if this layer cannot take the pass (e.g. group size)."""

    def record_facts(self, name: str, module: nn.Module) -> dict[str, Any]:
        """What the record of layer ``name`` must say about how this pass made ``module`` (what it returned,
        or left in place, for that layer) that the module itself does not: any of ``observer``, ``actorder``
        and ``sparsity`` (``compress.core.records``). The sweep reads the scheme, layout and shapes from the
        module and merges these facts into the layer's record; keys left out keep what earlier stages said.

        The default fits a quantizer whose config has an ``observer`` (min/max when it has none): a new
        quantizer needs no override. Pruners name their pattern; GPTQ adds ``actorder``."""
        if not isinstance(module, QuantLinear):
            return {}
        return {"observer": getattr(self.config, "observer", None) or "minmax"}


class LayerPass(Pass):
    """One method applied layer by layer. Subclasses set ``config_cls`` and implement ``apply``."""

    scope: ClassVar[Scope] = "layer"

    @abstractmethod
    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        """Return the module that replaces ``linear`` (may be ``linear`` itself, modified)."""

    def apply_layer(self, name: str, linear: nn.Linear, stats: Any | None, prior: LayerRecord | None) -> nn.Module:
        """What the sweep calls: ``apply``, given also the layer's record so far (``prior``: what earlier
        stages made of it; None when none touched it). Override to read those facts (GPTQ keeps the zeros
        of a layer an earlier stage pruned)."""
        return self.apply(name, linear, stats)


class GroupPass(Pass):
    """A method that solves the layers reading one input together, with the module producing that input.

    The sweep hands it a ``Group`` per input tensor of the block, in call order: q/k/v with the attention
    norm, gate/up with the MLP norm, and, where the family allows it, o_proj with v_proj and down_proj with
    up_proj (``compress.models.producers``). Every linear reading the tensor is in the group (an ``ignore``
    pattern that splits them is refused), so a transform folded into the producer is compensated in all of
    its readers. Groups are learned from a forward pass, so a group pass is always calibrated.
    """

    scope: ClassVar[Scope] = "group"
    needs_calibration: ClassVar[bool] = True
    rewrites_producers: ClassVar[bool] = True
    needs_producer: ClassVar[bool] = True
    """True: a group whose producer cannot be folded into (o_proj under GQA, a GELU between two linears)
    stops the run with one sentence. False: such groups arrive with ``producer=None`` (AWQ skips them)."""

    @abstractmethod
    def apply_group(self, group: Group, stats: Mapping[str, Any]) -> Mapping[str, nn.Module]:
        """Replacements for members of ``group`` by full name; a member left out keeps its module (which
        the pass may have changed in place, like the producer)."""


@dataclass
class BlockWork:
    """Everything a block-scope solve may use, for one block."""

    index: int
    block: nn.Module
    layers: dict[str, nn.Linear]
    """The targeted layers of this block, by full name."""
    stats: dict[str, Any]
    """Their statistics (empty when the pass collects none)."""
    inputs: list[Tensor]
    """The block's input hidden states, one per calibration batch, as the compressed blocks before it
    produce them (on the offload device)."""
    targets: list[Tensor]
    """The block's outputs on ``inputs`` before this pass changed anything in it (on the offload device)."""
    forward: Callable[[int], Tensor]
    """``forward(i)``: the block as it is now, run on batch ``i`` (with that batch's masks and rotary
    arguments) on the compute device, returning its output hidden states."""


class BlockPass(Pass):
    """A method that solves a whole block at once against its original outputs (block-output
    reconstruction: learn rounding or scales so the compressed block reproduces ``work.targets``)."""

    scope: ClassVar[Scope] = "block"
    needs_calibration: ClassVar[bool] = True
    needs_grad: ClassVar[bool] = False
    """True: the solve runs with autograd enabled, on ordinary (not inference-mode) copies of the inputs and
    targets, so it can optimise parameters by gradient descent."""

    @abstractmethod
    def apply_block(self, work: BlockWork) -> Mapping[str, nn.Module]:
        """Replacements for layers of ``work.block`` by full name (layers left out keep their module)."""


class ModelPass(Pass):
    """A method that changes the model's shape (structured pruning): it removes channels, heads or blocks
    and the config changes with them.

    It still never sees an architecture: ``compress.models.structure`` names the layers (MLP in/out, q/k/v/o)
    and edits the config; the pass turns calibration statistics into what to keep and slices ``nn.Linear``s.
    The pipeline (``compress.pipeline.structured``) runs it through the block sweep, in a sweep of its own,
    before any layer-wise stage.
    """

    scope: ClassVar[Scope] = "model"
    needs_calibration: ClassVar[bool] = True
    changes_shapes: ClassVar[bool] = True


@dataclass
class ResidualEnds:
    """The modules outside the blocks that read or write the residual stream."""

    embedding: nn.Embedding
    """Writes it: each token's row is the first residual."""
    final_norm: nn.Module
    """The last norm (RMSNorm: ``x / rms(x) · weight``), read by the head."""
    head: nn.Linear
    """Reads the final norm's output (the LM head; already untied from the embedding)."""


@dataclass
class ResidualBlock:
    """One block's modules around the residual stream, and its attention's head layout."""

    norms: list[tuple[nn.Module, list[nn.Linear]]]
    """Each norm reading the residual (RMSNorm) with every linear reading its output (q/k/v; gate/up)."""
    writers: list[nn.Linear]
    """The linears whose output is added to the residual (o_proj, down_proj)."""
    value: nn.Linear
    """The value projection: rows ``[g·head_dim, (g+1)·head_dim)`` are KV head ``g``."""
    output: nn.Linear
    """The attention output projection: columns ``[h·head_dim, (h+1)·head_dim)`` read query head ``h``."""
    heads: int
    kv_heads: int
    head_dim: int


class TransformPass(Pass):
    """A data-free change of basis of the whole model that leaves its function unchanged before quantization
    (an orthogonal rotation of the residual stream, with the norms folded into their readers).

    The pipeline (``compress.pipeline.rotation``) calls ``transform_ends`` once, before block 0, with the
    embedding, the final norm and the head, then ``transform_block`` for each block as the sweep reaches it
    (so a streamed model is rotated block by block), before any other stage of that block's sweep. A transform
    rewrites every linear, so it comes before every stage that quantizes or prunes (``stage_order``)."""

    scope: ClassVar[Scope] = "transform"
    takes_stage_flags: ClassVar[bool] = False

    @abstractmethod
    def transform_ends(self, ends: ResidualEnds) -> None:
        """Rotate (in place) what sits outside the blocks."""

    @abstractmethod
    def transform_block(self, block: ResidualBlock) -> None:
        """Rotate (in place) one block's linears and fold its norms."""


PASSES: Registry[type[Pass]] = Registry("method")
