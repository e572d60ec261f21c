"""AWQ: activation-aware weight quantization as a group pass (the plumbing; the math is in awq_math).

Per group of layers reading one tensor (q/k/v after the attention norm, gate/up after the MLP norm, o_proj
after v_proj where V is as wide as o_proj's input, down_proj after up_proj):

1. the sweep feeds an ``InputSampleStats`` with the group's input: mean ``|x|`` per channel over every
   calibration token, and a seeded uniform sample of at most ``max_tokens`` input rows (the memory bound:
   ``max_tokens × in_features`` values per group, freed after the group);
2. the scale search (``awq_math.search_scale``) picks ``s = mean|x|^α`` on a grid of ``n_grid`` values of
   ``α ∈ [0, 1)`` by the output error of the group's layers on the sampled rows, weights fake-quantized on
   the target scheme; ``s`` is folded into the producer (``· 1/s``) and the readers (``· s``), exactly
   (``passes.groups.fold_scale_``), so before quantization the model computes what it computed;
3. with ``quantize: true`` (the default), the clipping search (``observer: mse``, AWQ's auto-clip) picks
   each row's and group's range shrink by the output error on the sampled rows, and the layers become
   ``QuantLinear``s (round-to-nearest with those scales). ``quantize: false`` stops after the fold: a later
   stage (``gptq``) quantizes the rescaled weights, which is AWQ+GPTQ.

A group with no foldable producer (o_proj under GQA, where V is narrower than o_proj's input) keeps unit
scales; it is still quantized (with the clipping search), and this is logged once per model. A stage in
which no targeted group has a producer is refused: it would be plain round-to-nearest.

A linear producer this stage quantized earlier in the same block (v_proj, then o_proj's fold; up_proj,
then down_proj's) takes the fold on its stored per-row scales: scaling an output row commutes with
per-(row, group) min/max quantization and with the per-row clipping search (its error scales by the
square of the factor), so the codes are those that folding before quantizing would give (AutoAWQ's
order: every scale of a block searched on the original weights, then quantized) and only the scales
move, rounded in their storage dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from compress.calibrate.stats import InputSampleStats
from compress.core.errors import CompressError
from compress.core.packing import PackedWeight
from compress.core.primitives import compute_qparams
from compress.kernels.quant_linear import QuantLinear
from compress.passes.base import PASSES, GroupPass
from compress.passes.groups import Group, fold_scale_, scale_inputs_
from compress.passes.quantize._config import WeightQuantConfig
from compress.passes.quantize.awq_math import group_gram, search_clip, search_scale

logger = logging.getLogger("compress")


class AWQConfig(WeightQuantConfig):
    """AWQ options; ``bits``, ``group_size``, ``symmetric``, ``indivisible`` come from the base."""

    method: Literal["awq"] = "awq"
    quantize: bool = True
    """Quantize after folding the scales (round-to-nearest with the clipping search). False: only fold, so
    a later quantize stage (e.g. ``gptq``) quantizes the rescaled weights."""
    observer: Literal["minmax", "mse"] = "mse"
    """``mse``: AWQ's clipping search, each row's and group's range shrink chosen by the output error on the
    sampled calibration rows; ``minmax``: the full range. Only with ``quantize: true``."""
    n_grid: int = Field(20, ge=1, le=1000)
    """Points of the ``α`` grid ``0, 1/n, ..., (n-1)/n`` for ``s = mean|x|^α``."""
    max_shrink: float = Field(0.5, ge=0, lt=1)
    """The clipping search tries range ratios from 1 down to ``1 - max_shrink``."""
    clip_grid: int = Field(20, ge=1, le=1000)
    """Steps of the clipping search between those ratios."""
    max_tokens: int = Field(4096, ge=1)
    """Input rows sampled per group (uniformly over all calibration tokens, seeded) to score candidates;
    the mean ``|x|`` uses every token."""
    seed: int = 0
    """Seed of that sample: the same inputs give the same rows, hence the same bytes."""


def _block_of(name: str) -> str | None:
    """The block a layer sits in, from its name (``model.layers.3.mlp.up_proj`` → ``model.layers.3``): the
    sweep hands groups block by block, and block names end in their index."""
    parts = name.split(".")
    at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return None if at is None else ".".join(parts[: at + 1])


def _scale_quantized_rows_(module: QuantLinear, rows: tuple[int, int] | None, factor: Tensor,
                           dtype: torch.dtype) -> None:
    """Multiply output rows of a freshly packed layer by ``factor`` through its scales (and bias); the codes
    (and zero points) are unchanged, as quantizing the scaled rows would give."""
    if not isinstance(module.storage(), PackedWeight):
        raise CompressError(f"a layer stored as {module.format} cannot take a folded AWQ scale")
    start, stop = rows if rows is not None else (0, module.out_features)
    with torch.no_grad():
        stored = module.weight_scale
        f = factor.to(device=stored.device, dtype=torch.float32)
        scaled = (stored[start:stop].float() * f[:, None]).to(stored.dtype)
        stored[start:stop] = torch.where(scaled == 0, torch.finfo(stored.dtype).tiny, scaled)
        if module.bias is not None:
            bias = module.bias.data
            bias[start:stop] = (bias[start:stop].float() * f).to(bias.dtype)
    module.hold_dense_weight(dtype)  # refresh the dense copy the sweep runs the block with


@PASSES.register("awq")
class AWQPass(GroupPass):
    """Activation-aware per-channel scales folded into each group's producer, then (by default) RTN with
    AWQ's clipping search."""

    config_cls = AWQConfig
    needs_producer: ClassVar[bool] = False
    config: AWQConfig

    def __init__(self, config: AWQConfig) -> None:
        super().__init__(config)
        self._made: dict[str, torch.dtype] = {}
        """Layers this stage packed, with their dense dtype (so a later fold can reach their scales)."""
        self._targets: set[str] = set()
        self._done: set[str] = set()
        self._first_block: str | None = None
        self._bare: list[str] = []
        """First layer of each group of the first block that had no producer."""
        self._any_producer = False
        self._reported = False

    def make_stats(self, name: str, linear: nn.Linear) -> InputSampleStats:
        return InputSampleStats(linear.in_features, self.config.max_tokens, self.config.seed)

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        self.config.scheme_for(linear.in_features).check_layer(name, linear.in_features)
        self._targets.add(name)

    def quantizes(self) -> bool:
        return self.config.quantize

    def describe(self) -> str:
        return self.config.scheme.tag

    def apply_group(self, group: Group, stats: Mapping[str, Any]) -> Mapping[str, nn.Module]:
        self._account(group)
        stat = stats.get(group.names[0])
        if not isinstance(stat, InputSampleStats):
            raise CompressError(f"AWQ needs calibration inputs for layer {group.names[0]}, got none")
        cfg = self.config
        schemes = [cfg.scheme_for(layer.in_features) for layer in group.layers]
        x = stat.rows
        if group.producer is not None and x.shape[0] > 0:
            x = x.to(device=group.layers[0].weight.device, dtype=torch.float32)
            found = search_scale([layer.weight for layer in group.layers], schemes, x, stat.mean_abs,
                                 n_grid=cfg.n_grid)
            logger.debug("awq %s: alpha %.2f, output error %.6g (unscaled %.6g)", group.names[0], found.alpha,
                         min(found.losses), found.losses[0])
            if found.alpha > 0:  # alpha 0 is the unit scale: nothing to fold
                self._fold(group, found.scale)
                x = x / found.scale
        if not cfg.quantize:
            return {}
        replacements: dict[str, nn.Module] = {}
        grams: dict[int, Tensor] = {}
        for name, layer, scheme in zip(group.names, group.layers, schemes, strict=True):
            if cfg.observer == "mse" and x.shape[0] > 0:
                x = x.to(device=layer.weight.device, dtype=torch.float32)
                key = scheme.effective_group_size(layer.in_features)
                if key not in grams:
                    grams[key] = group_gram(x, scheme)
                ratio = search_clip(layer.weight, scheme, grams[key], grid=cfg.clip_grid,
                                    max_shrink=cfg.max_shrink)
                scale, zero_point = compute_qparams(layer.weight.detach(), scheme, clip_ratio=ratio)
                quantized = QuantLinear.from_linear(layer, scheme, scale=scale, zero_point=zero_point)
            else:
                quantized = QuantLinear.from_linear(layer, scheme)
            self._made[name] = layer.weight.dtype
            replacements[name] = quantized
        return replacements

    def _fold(self, group: Group, scale: Tensor) -> None:
        """Weights ``· s`` per input column, the producer's output ``· 1/s``."""
        producer = group.producer
        assert producer is not None
        if isinstance(producer.module, QuantLinear) and producer.name in self._made:
            _scale_quantized_rows_(producer.module, producer.rows, scale.reciprocal(), self._made[producer.name])
            scale_inputs_(group.layers, scale)
        else:
            fold_scale_(group, scale.reciprocal())

    def _account(self, group: Group) -> None:
        """Track producers per block: log once which groups have none, refuse when none has one."""
        block = _block_of(group.names[0])
        if self._first_block is None:
            self._first_block = block
        if not self._reported and block != self._first_block:
            self._report()
        if group.producer is not None:
            self._any_producer = True
        elif block == self._first_block:
            self._bare.append(group.names[0])
        self._done.update(group.names)
        if not self._reported and self._targets and self._done >= self._targets:
            self._report()

    def _report(self) -> None:
        self._reported = True
        if not self._any_producer:
            first = self._bare[0] if self._bare else "the targeted layers"
            raise CompressError(
                f"method awq found no norm or linear producing the input of any targeted layer (first: {first}) to "
                "fold its scales into, so it would be plain round-to-nearest; use --method rtn or gptq, or target "
                "layers whose input a norm or linear produces")
        if self._bare:
            listed = ", ".join(self._bare[:3]) + (f" and {len(self._bare) - 3} more" if len(self._bare) > 3 else "")
            what = "quantized with unit scales (the clipping search still applies)" if self.config.quantize \
                else "left unchanged"
            logger.warning("awq: nothing foldable produces the input of %s (nor of the same layers in the other "
                           "blocks); those layers are %s", listed, what)
