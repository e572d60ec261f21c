"""``lowrank``: a layer-wise quantizer plus rank-r factors of its error in the activation-weighted norm (EoRA).

The stage wraps the quantizer it compensates::

    stages:
      - method: lowrank
        rank: 32
        quantizer: {method: gptq, bits: 3, group_size: 128}

Per layer it runs the wrapped quantizer's own solve (same config, same statistics), then fits
``B A ≈ W - Ŵ`` against the layer's calibration Hessian (``lowrank_math.weighted_lowrank``) and attaches the
factors to the returned ``QuantLinear`` (``y = Ŵx + B(Ax)``).

Why a wrapping stage and not a stage after the quantizer, nor a field on every quantizer:

- the error needs the dense weight ``W``, which the sweep drops when the quantizer swaps the layer; a
  later stage would be handed only the ``QuantLinear`` (the sweep reads ``layer.weight`` of what it hands
  over, which packed codes do not have, and the stage-order check rightly refuses a dense-weight stage
  after a quantizer). Keeping ``W`` per block and handing it over would change the pipeline for one method;
- a later stage would collect its Hessian again, in a second set of forwards, and with ``true_sequential``
  off the later groups of a block (o_proj, down_proj) would see inputs from the already-quantized
  groups, not the inputs the quantizer was solved on. Wrapping reuses the quantizer's own statistics, so
  the compensation is fitted on exactly the inputs the quantizer saw, at the cost of one eigendecomposition
  and one SVD per layer;
- a field would have to be added to every quantizer's config and solve; wrapping works for every
  layer-wise quantizer (RTN, GPTQ, and any later one) without touching them, and to the stage-order check
  and the exporter the stage is simply a quantizer.

Group-scope quantizers (AWQ) solve several layers at once and are refused with one sentence.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, SerializeAsAny, field_validator, model_validator
from torch import Tensor, nn

from compress.calibrate.stats import HessianStats
from compress.core.errors import CompressError
from compress.core.records import LayerRecord
from compress.kernels.quant_linear import QuantLinear
from compress.passes.base import PASSES, LayerPass, PassConfig
from compress.passes.quantize.lowrank_math import hessian_eigen, weighted_error, weighted_lowrank

logger = logging.getLogger("compress")

METHOD = "lowrank"


class LowRankConfig(PassConfig):
    """A quantizer stage (``quantizer``) with rank-``rank`` error compensation."""

    method: Literal["lowrank"] = "lowrank"
    rank: int = Field(gt=0)
    """Rank of the factors; below ``min(in, out)`` of every targeted layer. Costs ``rank · (in + out)``
    values of the model's dtype per layer (32 on a 4096x4096 layer: 1.6% of its fp16 weight)."""
    damp: float = Field(0.01, gt=0, lt=1)
    """Eigenvalue guard: ``damp · mean(eigenvalues of H)`` is added to every eigenvalue before weighting."""
    quantizer: SerializeAsAny[PassConfig]
    """The wrapped layer-wise quantizer stage (``{method: gptq, bits: 3, ...}``); its ``ignore`` is the stage's."""

    @model_validator(mode="before")
    @classmethod
    def _one_ignore(cls, data: Any) -> Any:
        """The stage and its quantizer target the same layers: one ``ignore`` list, given on either."""
        if not isinstance(data, dict) or not isinstance(data.get("quantizer"), dict):
            return data
        inner = dict(data["quantizer"])
        if "ignore" in data and "ignore" in inner and list(data["ignore"]) != list(inner["ignore"]):
            raise ValueError("sets ignore on the lowrank stage and a different one on its quantizer; give it once")
        ignore = data.get("ignore", inner.get("ignore"))
        if ignore is None:
            return data
        return {**data, "ignore": ignore, "quantizer": {**inner, "ignore": ignore}}

    @field_validator("quantizer", mode="before")
    @classmethod
    def _quantizer_config(cls, value: Any) -> Any:
        if isinstance(value, PassConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError("must be a stage mapping such as {method: gptq, bits: 3}")
        method = value.get("method")
        if method == METHOD:
            raise ValueError("cannot wrap another lowrank stage")
        if method not in PASSES:
            raise ValueError(f"names an unknown method {method!r}; use one of "
                             f"{', '.join(n for n in PASSES.names() if n != METHOD)}")
        layer_pass = PASSES.get(method)
        if not issubclass(layer_pass, LayerPass):
            raise ValueError(f"method {method} solves {layer_pass.scope}s of layers together; low-rank "
                             "compensation wraps layer-wise quantizers (rtn, gptq, ...)")
        return layer_pass.config_cls.model_validate(value)

    @property
    def scheme(self):
        return self.quantizer.scheme  # type: ignore[attr-defined]

    def scheme_for(self, in_features: int):
        return self.quantizer.scheme_for(in_features)  # type: ignore[attr-defined]

    @property
    def storage_format(self) -> str:
        return getattr(self.quantizer, "storage_format", "pack-quantized")


class _BothStats:
    """The wrapped quantizer's own statistic and the Hessian the compensation needs, fed the same inputs."""

    def __init__(self, inner: Any, hessian: HessianStats) -> None:
        self.inner = inner
        self.hessian_stats = hessian

    def add_batch(self, x: Tensor) -> None:
        self.inner.add_batch(x)
        self.hessian_stats.add_batch(x)

    def free(self) -> None:
        if hasattr(self.inner, "free"):
            self.inner.free()
        self.hessian_stats.free()


@PASSES.register(METHOD)
class LowRankPass(LayerPass):
    """Quantize with the wrapped pass, then add the activation-weighted rank-r fit of the error."""

    config_cls = LowRankConfig
    needs_calibration = True
    config: LowRankConfig

    def __init__(self, config: LowRankConfig) -> None:
        super().__init__(config)
        inner_cls = PASSES.get(config.quantizer.method)
        self.inner: LayerPass = inner_cls(config.quantizer)  # type: ignore[assignment]
        if not self.inner.quantizes():
            raise CompressError(f"method {config.quantizer.method} does not quantize, so it leaves no quantization "
                                "error to compensate; wrap rtn, gptq or another quantizer")
        self.reduction: dict[str, float] = {}
        """Layer name → weighted output error after / before the compensation (a debug log, tests)."""
        self._eigen: tuple[HessianStats, tuple[Tensor, Tensor]] | None = None
        """The last accumulator's eigendecomposition: layers reading one tensor share one accumulator."""

    def quantizes(self) -> bool:
        return True

    def describe(self) -> str:
        """The wrapped quantizer's tag (the scheme tag, which the dry-run plan and the per-channel fallback
        count compare each layer's scheme with); the rank is in each layer's record (``lowrank``)."""
        return self.inner.describe()

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        self.inner.check_layer(name, linear)
        limit = min(linear.in_features, linear.out_features)
        if self.config.rank >= limit:
            raise CompressError(f"lowrank rank {self.config.rank} must be below min(in, out) = {limit} of layer "
                                f"{name} ({linear.out_features}x{linear.in_features}), or the factors cost more than "
                                "the dense weight; lower the rank or ignore the layer")

    def make_stats(self, name: str, linear: nn.Linear) -> Any:
        inner = self.inner.make_stats(name, linear) if self.inner.needs_calibration else None
        if isinstance(inner, HessianStats):
            return inner  # GPTQ's own Hessian: the compensation is fitted on the very statistic it was solved on
        hessian = HessianStats(linear.in_features)
        return hessian if inner is None else _BothStats(inner, hessian)

    def record_facts(self, name: str, module: nn.Module) -> dict[str, Any]:
        facts = self.inner.record_facts(name, module)
        if isinstance(module, QuantLinear) and module.lowrank_rank is not None:
            facts["lowrank"] = module.lowrank_rank
        return facts

    def apply_layer(self, name: str, linear: nn.Linear, stats: Any | None, prior: LayerRecord | None) -> nn.Module:
        hessian, inner_stats = self._split(name, stats)
        self.check_layer(name, linear)
        weight = linear.weight.detach().to(torch.float32).clone()  # before the quantizer touches anything
        h = hessian.hessian.clone()  # a quantizer may damp its Hessian in place
        module = self.inner.apply_layer(name, linear, inner_stats, prior)
        if not isinstance(module, QuantLinear):
            raise CompressError(f"method {self.inner.config.method} left layer {name} unquantized, so there is "
                                "no quantization error to compensate")
        delta = weight.to(h.device) - module.dequantized_weight(torch.float32).to(h.device)
        if self._eigen is None or self._eigen[0] is not hessian:
            self._eigen = (hessian, hessian_eigen(h))
        a, b = weighted_lowrank(delta, h, self.config.rank, damp=self.config.damp, eigen=self._eigen[1])
        module.set_lowrank(a, b)
        # what the stored (model-dtype) factors achieve, not the float32 ones
        stored_a, stored_b = module.lora_A, module.lora_B
        assert stored_a is not None and stored_b is not None
        before = weighted_error(delta, h)
        after = weighted_error(delta, h, stored_a.to(h.device), stored_b.to(h.device))
        self.reduction[name] = after / before if before > 0 else 1.0
        logger.debug("layer %s: rank-%d compensation leaves %.3g of the output error", name, self.config.rank,
                     self.reduction[name])
        return module

    def apply(self, name: str, linear: nn.Linear, stats: Any | None = None) -> nn.Module:
        return self.apply_layer(name, linear, stats, None)

    def _split(self, name: str, stats: Any | None) -> tuple[HessianStats, Any | None]:
        """(the Hessian, what the wrapped quantizer gets)."""
        if isinstance(stats, _BothStats):
            hessian, inner = stats.hessian_stats, stats.inner
        elif isinstance(stats, HessianStats):
            hessian, inner = stats, (stats if self.inner.needs_calibration else None)
        else:
            raise CompressError(f"low-rank compensation needs calibration inputs for layer {name}, and got none")
        if hessian.tokens == 0:
            raise CompressError(f"calibration produced no tokens for layer {name}; low-rank compensation is "
                                "fitted on them and cannot run")
        return hessian, inner
