"""A pass as a sweep step: its targeted layers of each block, solved at the pass's scope.

- layer scope (``LayerPass``): each group of layers sharing an input is calibrated (one shared accumulator
  where ``share_key`` allows), then every layer is solved on its own and swapped;
- group scope (``GroupPass``): the layers reading one tensor are handed over together with the module that
  produces it (``compress.models.producers`` names it), then swapped;
- block scope (``BlockPass``): statistics of every targeted layer, the block's outputs before the pass
  touched it, and a way to run the block on each calibration batch.

With ``true_sequential`` off, the statistics of every group come from one forward on the block's inputs;
on, each group is calibrated after the groups before it were solved.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from compress.calibrate.capture import block_output
from compress.core.errors import CompressError
from compress.models.producers import no_producer, resolve_producer
from compress.passes.base import BlockPass, BlockWork, GroupPass, LayerPass, Pass
from compress.passes.groups import Group, Producer
from compress.pipeline.groups import TensorGroup, folds_exactly, free_stats
from compress.pipeline.sequential import BlockContext, Step


def _by_block(names: list[str], block_path: str) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = {}
    prefix = f"{block_path}."
    for name in names:
        if not name.startswith(prefix):
            raise CompressError(f"layer {name} is outside the blocks at {block_path}")
        grouped.setdefault(int(name[len(prefix):].split(".", 1)[0]), []).append(name)
    return grouped


class PassStep(Step):
    """``layer_pass`` applied to ``names`` (full layer names, all inside the blocks at ``block_path``)."""

    def __init__(self, layer_pass: Pass, names: list[str], block_path: str) -> None:
        self.layer_pass = layer_pass
        self.names = names
        self.method = layer_pass.config.method
        self.needs_calibration = layer_pass.needs_calibration
        if layer_pass.scope in ("group", "block") and not self.needs_calibration:
            raise CompressError(f"method {self.method} solves {layer_pass.scope}s, which are learned from and fed "
                                "by calibration forwards, so it must set needs_calibration")
        self._by_block = _by_block(names, block_path)

    def run_block(self, ctx: BlockContext) -> None:
        names = self._by_block.get(ctx.index, [])
        if not names:
            return
        if isinstance(self.layer_pass, BlockPass):
            self._solve_block(ctx, names)
            return
        grouped = isinstance(self.layer_pass, GroupPass)
        producers = None
        if grouped:  # groups and producers are learned from a forward: a group pass is always calibrated
            found = ctx.probe(names, with_readers=True)
            groups, stop_early = [g.names for g in found.by_tensor], found.stop_early
            producers = [self._producer(ctx, g) for g in found.by_tensor]
        elif self.needs_calibration:
            found = ctx.probe(names)
            groups, stop_early = found.groups, found.stop_early
        else:
            groups, stop_early = [names], False
        precomputed = None
        if self.needs_calibration and not ctx.true_sequential and len(groups) > 1:
            # every group's statistics from one forward on the block's (uncompressed) inputs
            everything = [name for group in groups for name in group]
            one = ctx.collect(self.layer_pass.make_stats, everything, stop_early=stop_early, shared_within=groups)
            precomputed = [{name: one[name] for name in group} for group in groups]
        for number, group in enumerate(groups):
            if precomputed is not None:
                stats = precomputed[number]
            elif self.needs_calibration:
                stats = ctx.collect(self.layer_pass.make_stats, group, stop_early=stop_early)
            else:
                stats = {}
            if producers is not None:
                producer = producers[number]
                if producer is not None:  # the module as it is now (an earlier group may have replaced it)
                    producer = replace(producer, module=ctx.model.get_submodule(producer.name))
                self._solve_group(ctx, group, producer, stats)
            else:
                self._solve_layers(ctx, group, stats)
            free_stats(stats)

    def _record(self, ctx: BlockContext, names: list[str], replacements: Mapping[str, nn.Module],
                originals: dict[str, torch.Tensor]) -> None:
        unknown = [name for name in replacements if name not in originals]
        if unknown:
            raise CompressError(f"method {self.method} returned a replacement for {unknown[0]}, which it was not "
                                "given")
        tag = self.layer_pass.describe()
        for name in names:
            replacement = replacements.get(name, ctx.model.get_submodule(name))
            ctx.replace(name, replacement, original=originals[name], method=self.method, tag=tag,
                        facts=self.layer_pass.record_facts(name, replacement))

    def _solve_layers(self, ctx: BlockContext, group: list[str], stats: dict[str, Any]) -> None:
        assert isinstance(self.layer_pass, LayerPass)
        for name in group:
            linear = ctx.model.get_submodule(name)
            original = linear.weight.detach()
            replacement = self.layer_pass.apply_layer(name, linear, stats.get(name), ctx.record_of(name))
            self._record(ctx, [name], {name: replacement}, {name: original})

    def _producer(self, ctx: BlockContext, found: TensorGroup) -> Producer | None:
        """The producer of one tensor group; refuses a group an ignore pattern split, or (when the pass
        needs one) a group nothing foldable produces."""
        assert isinstance(self.layer_pass, GroupPass)
        cut = len(ctx.prefix) + 1
        left_out = sorted(set(found.readers) - {name[cut:] for name in found.names})
        if left_out:
            raise CompressError(f"method {self.method} transforms every layer reading one input together, but the "
                                f"ignore patterns leave out {ctx.prefix}.{left_out[0]}, which reads the same input as "
                                f"{found.names[0]}; ignore all of them or none")
        spec = None
        if found.readers:
            spec = resolve_producer(ctx.model.config, ctx.block, found.readers, learned_norm=found.norm)
        producer = None
        if spec is not None:
            producer = Producer(f"{ctx.prefix}.{spec.name}", ctx.block.get_submodule(spec.name), spec.kind, spec.rows)
            layers = tuple(ctx.model.get_submodule(name) for name in found.names)
            if spec.learned and not folds_exactly(ctx.block, ctx.inputs[0], ctx.device,
                                                  Group(tuple(found.names), layers, producer)):
                producer = None  # its output also flows where no reader compensates (a post-norm residual)
        if producer is None and self.layer_pass.needs_producer:
            raise no_producer(self.method, found.names, str(getattr(ctx.model.config, "model_type", "?")))
        return producer

    def _solve_group(self, ctx: BlockContext, names: list[str], producer: Producer | None,
                     stats: dict[str, Any]) -> None:
        assert isinstance(self.layer_pass, GroupPass)
        layers = tuple(ctx.model.get_submodule(name) for name in names)
        originals = {name: layer.weight.detach() for name, layer in zip(names, layers, strict=True)}
        replacements = self.layer_pass.apply_group(Group(tuple(names), layers, producer), stats)
        self._record(ctx, names, replacements, originals)

    def _solve_block(self, ctx: BlockContext, names: list[str]) -> None:
        layer_pass = self.layer_pass
        assert isinstance(layer_pass, BlockPass)
        stats: dict[str, Any] = {}
        if names:
            found = ctx.probe(names)
            stats = ctx.collect(layer_pass.make_stats, names, stop_early=found.stop_early,
                                shared_within=found.groups)
        inputs = [item.hidden for item in ctx.inputs]
        targets = ctx.outputs()
        layers = {name: ctx.model.get_submodule(name) for name in names}
        originals = {name: layer.weight.detach() for name, layer in layers.items()}
        with ExitStack() as stack:
            batches = ctx.inputs
            if layer_pass.needs_grad:  # ordinary tensors, so autograd may save them for backward
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.enable_grad())
                batches = [item.copy() for item in batches]
                inputs, targets = [x.clone() for x in inputs], [y.clone() for y in targets]

            def forward(i: int) -> torch.Tensor:
                return block_output(ctx.block, batches[i].to(ctx.device))

            work = BlockWork(ctx.index, ctx.block, layers, stats, inputs, targets, forward)
            replacements = layer_pass.apply_block(work)
        self._record(ctx, names, replacements, originals)
        free_stats(stats)
