"""AutoRound (SignRound, Cheng et al. 2023): learned rounding and clipping, block by block.

For each block, every targeted linear gets a rounding offset per weight and a min/max shrink factor per
(row, group) (``autoround_math``). They are trained by signed gradient descent so that the block with
fake-quantized weights reproduces its original outputs on the calibration inputs (the block sweep's
``BlockWork.targets``: the fp block run on the inputs the already-quantized blocks before it produce, so
errors of earlier blocks are compensated, as GPTQ's sequential mode does). The exported layers are ordinary
``pack-quantized`` codes: any reader of that layout runs them, with no extra operator.

Signed gradient steps (``p -= lr · sign(∂L/∂p)``) with a linearly decaying rate, the offsets kept in
[-½, ½] and the factors in [½, 1], are what the paper argues for: the offsets only need to cross a rounding
boundary, so the step size, not the gradient's magnitude, decides how far they move. The solve starts at
round-to-nearest, and the learned state is kept only if its loss on all calibration batches is lower than
RTN's: the result is never worse than RTN on the calibration data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from compress.core.errors import CompressError
from compress.core.packing import PackedWeight, scale_dtype_for
from compress.kernels.quant_linear import QuantLinear
from compress.passes.base import PASSES, BlockPass, BlockWork
from compress.passes.quantize._config import SchemeQuantizer, WeightQuantConfig
from compress.passes.quantize.autoround_math import Rounding, fake_quantize, final_codes

logger = logging.getLogger("compress")


class AutoRoundConfig(WeightQuantConfig):
    """AutoRound options; ``bits``, ``group_size``, ``symmetric`` come from the base (scales start at min/max)."""

    method: Literal["autoround"] = "autoround"
    observer: Literal["minmax"] = "minmax"
    """The starting scales (min/max); the learned range factors then shrink them."""
    iters: int = Field(200, ge=1)
    """Signed-gradient steps per block, one calibration batch each (AutoRound's default is 200)."""
    lr: float | None = Field(None, gt=0)
    """Step size at the start, decaying linearly to 0; ``None``: ``1 / iters`` (AutoRound's default), so the
    steps of a run add up to at most half a rounding step."""
    learn_range: bool = True
    """Also learn the per-group min/max shrink factors (AutoRound's ``minmax_tuning``)."""
    seed: int = 0
    """Order in which the calibration batches are visited."""


class _LearnedLinear(nn.Module):
    """An ``nn.Linear`` stand-in during the solve: its weight fake-quantized under the learnable state."""

    def __init__(self, linear: nn.Linear, scheme, state: Rounding) -> None:
        super().__init__()
        self.linear, self.scheme, self.state = linear, scheme, state
        self.frozen = linear.weight.detach().float()

    def forward(self, x: Tensor) -> Tensor:
        w = fake_quantize(self.frozen, self.scheme, self.state).to(x.dtype)
        return F.linear(x, w, None if self.linear.bias is None else self.linear.bias.to(x.dtype))


@PASSES.register("autoround")
class AutoRoundPass(SchemeQuantizer, BlockPass):
    """Learned rounding and clipping per block against the block's original outputs."""

    config_cls = AutoRoundConfig
    needs_grad = True
    config: AutoRoundConfig

    def apply_block(self, work: BlockWork) -> Mapping[str, nn.Module]:
        if not work.layers:
            return {}
        if not work.inputs:
            raise CompressError(f"AutoRound needs calibration inputs for block {work.index}, and saw none")
        cfg = self.config
        stand_ins: dict[str, _LearnedLinear] = {}
        parents = _parents(work.block, work.layers)
        for name, linear in work.layers.items():
            self.check_layer(name, linear)
            scheme = cfg.scheme_for(linear.in_features)
            stand_ins[name] = _LearnedLinear(linear, scheme, Rounding.start(linear.weight, scheme,
                                                                            learn_range=cfg.learn_range))
        frozen = [p for p in work.block.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            _swap(parents, stand_ins)
            start = self._loss_on_all(work)
            initial = {name: s.state.snapshot() for name, s in stand_ins.items()}
            self._train(work, stand_ins)
            end = self._loss_on_all(work)
            if end >= start:  # keep RTN where learning did not help on the calibration data
                logger.info("block %d: AutoRound did not lower the block loss (%.4g -> %.4g); kept RTN",
                            work.index, start, end)
                for name, s in stand_ins.items():
                    s.state = initial[name]
            logger.debug("block %d: AutoRound block loss %.4g -> %.4g", work.index, start, min(start, end))
        finally:
            _swap(parents, {name: s.linear for name, s in stand_ins.items()})
            for p in frozen:
                p.requires_grad_(True)
        return {name: self._pack(s) for name, s in stand_ins.items()}

    def _train(self, work: BlockWork, stand_ins: Mapping[str, _LearnedLinear]) -> None:
        cfg = self.config
        params = [p for s in stand_ins.values() for p in s.state.parameters()]
        lr0 = cfg.lr if cfg.lr is not None else 1.0 / cfg.iters
        generator = torch.Generator().manual_seed(cfg.seed + work.index)
        order: list[int] = []
        for step in range(cfg.iters):
            if not order:
                order = torch.randperm(len(work.inputs), generator=generator).tolist()
            i = order.pop()
            loss = F.mse_loss(work.forward(i).float(), work.targets[i].to(_device_of(stand_ins)).float())
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            lr = lr0 * (1.0 - step / cfg.iters)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        p.sub_(lr * g.sign())
            for s in stand_ins.values():
                s.state.clamp_()

    def _loss_on_all(self, work: BlockWork) -> float:
        """Mean block-output MSE over every calibration batch (the acceptance test of the learned state)."""
        with torch.no_grad():
            total = sum(_batch_loss(work, i, y) for i, y in enumerate(work.targets))
        return total / max(len(work.targets), 1)

    def _pack(self, stand_in: _LearnedLinear) -> QuantLinear:
        linear = stand_in.linear
        dtype = scale_dtype_for(linear.weight.dtype)
        codes, scale, zp = final_codes(stand_in.frozen, stand_in.scheme, stand_in.state, dtype)
        packed = PackedWeight.from_codes(codes, scale.to(dtype), zp, stand_in.scheme)
        return QuantLinear.from_packed(packed, None if linear.bias is None else linear.bias.detach())


def _batch_loss(work: BlockWork, i: int, target: Tensor) -> float:
    out = work.forward(i).float()
    return float(F.mse_loss(out, target.to(out.device).float()))


def _device_of(stand_ins: Mapping[str, _LearnedLinear]) -> torch.device:
    return next(iter(stand_ins.values())).frozen.device


def _parents(block: nn.Module, layers: Mapping[str, nn.Linear]) -> dict[str, tuple[nn.Module, str]]:
    """Full layer name → (its parent module inside ``block``, attribute name), found by identity."""
    wanted = {id(m): name for name, m in layers.items()}
    found: dict[str, tuple[nn.Module, str]] = {}
    for parent in block.modules():
        for attr, child in parent.named_children():
            if id(child) in wanted:
                found[wanted[id(child)]] = (parent, attr)
    missing = set(layers) - set(found)
    if missing:
        raise CompressError(f"AutoRound could not find {sorted(missing)[0]} inside its block")
    return found


def _swap(parents: Mapping[str, tuple[nn.Module, str]], modules: Mapping[str, nn.Module]) -> None:
    for name, module in modules.items():
        parent, attr = parents[name]
        setattr(parent, attr, module)
