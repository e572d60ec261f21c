"""How the sweep learns a block's structure from one forward, and feeds layer statistics cheaply.

``execution_groups`` runs the block once on a calibration batch with hooks on the targeted linears: layers
fed the same tensor (q/k/v; gate/up) form a group, in call order, so no per-family table is needed for
grouping. For group passes it also records which linears (targeted or not) and which norm-like module see
each tensor, so the producer of a group can be named (``compress.models.producers``).

``collect_stats`` then feeds each layer's statistics, one forward per calibration batch, stopping the
forward as soon as the group's last layer has received its input (``_GroupSeen``) and letting layers that
read one tensor share one accumulator (``share_key``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from compress.calibrate.capture import BlockInput, block_output
from compress.models.blocks import find_linears
from compress.models.producers import norm_like
from compress.passes.groups import Group, fold_scale_

MakeStats = Callable[[str, nn.Linear], object]


@dataclass
class TensorGroup:
    """The targeted layers reading one tensor (in call order, wherever they sit in the block), every linear
    of the block reading it, and the norm-like module whose output it is (names relative to the block)."""

    names: list[str]
    readers: list[str]
    norm: str | None


@dataclass
class BlockGroups:
    """The targeted layers of one block grouped by shared input, in call order, and whether a group's
    statistics may be collected by a forward that stops as soon as the group's last layer is reached."""

    groups: list[list[str]]
    stop_early: bool
    """True when every layer was called exactly once in the probing forward: then nothing after the
    group's layers can influence their inputs, so the rest of the block need not run."""
    by_tensor: list[TensorGroup] = field(default_factory=list)
    """Filled when asked (``with_readers``): the groups merged by input tensor, for group passes."""


def _same(x: Tensor, y: Tensor) -> bool:
    return x is y or (x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride())


def execution_groups(model: nn.Module, block: nn.Module, names: list[str], sample: BlockInput,
                     device: torch.device, *, with_readers: str | None = None) -> BlockGroups:
    """``names`` grouped by shared input, in the order the block calls them.

    Layers fed the same tensor (q/k/v; gate/up) form one group, calibrated together; a later group sees
    the outputs of earlier, already-compressed groups. Learned from one forward pass, so no per-family table.
    ``with_readers``: the block's full name, to also fill ``by_tensor`` (every linear and norm of the block
    is hooked then, so the inputs of all of them are compared)."""
    order: list[str] = []
    seen_input: dict[str, Tensor] = {}  # holds every input alive, so no two can share an address
    calls: dict[str, int] = {}
    others: dict[str, Tensor] = {}
    norms: dict[str, Tensor] = {}
    handles = []
    for name in names:
        def hook(module, inputs, output, name=name):
            calls[name] = calls.get(name, 0) + 1
            if name not in seen_input:
                seen_input[name] = inputs[0]
                order.append(name)
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    if with_readers is not None:  # (a forward hook that returns a value replaces the output: these return None)
        def reader(module, inputs, output, name: str) -> None:
            others.setdefault(name, inputs[0])

        def norm(module, inputs, output, name: str) -> None:
            norms.setdefault(name, output)

        for name, linear in find_linears(block, with_readers).items():
            if name not in names:
                handles.append(linear.register_forward_hook(partial(reader, name=name)))
        for name, module in norm_like(block).items():
            handles.append(module.register_forward_hook(partial(norm, name=name)))
    try:
        block_output(block, sample.to(device))
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in order:
        x = seen_input[name]
        previous = seen_input[groups[-1][0]] if groups else None
        if previous is not None and _same(x, previous):
            groups[-1].append(name)
        else:
            groups.append([name])
    missing = [n for n in names if n not in seen_input]
    if missing:  # never called during the forward (e.g. an unused branch): compress it last on no data
        groups.append(missing)
    found = BlockGroups(groups, stop_early=not missing and all(count == 1 for count in calls.values()))
    if with_readers is not None:
        found.by_tensor = _by_tensor(order, seen_input, others, norms, with_readers) + (
            [TensorGroup(missing, [], None)] if missing else [])
    return found


def _by_tensor(order: list[str], seen: dict[str, Tensor], others: dict[str, Tensor], norms: dict[str, Tensor],
               prefix: str) -> list[TensorGroup]:
    cut = len(prefix) + 1
    merged: list[TensorGroup] = []
    tensors: list[Tensor] = []
    for name in order:
        x = seen[name]
        at = next((i for i, t in enumerate(tensors) if _same(x, t)), None)
        if at is None:
            norm = next((n for n, out in norms.items() if _same(x, out)), None)
            merged.append(TensorGroup([name], [name[cut:]], norm))
            tensors.append(x)
        else:
            merged[at].names.append(name)
            merged[at].readers.append(name[cut:])
    for name, x in others.items():
        at = next((i for i, t in enumerate(tensors) if _same(x, t)), None)
        if at is not None:
            merged[at].readers.append(name[cut:])
    return merged


class _GroupSeen(Exception):
    """Raised once every layer of the group being calibrated has received its input."""


def share_stats(stats: dict[str, object], shared_within: list[list[str]]) -> dict[str, object]:
    """Layers of a group read the same tensor, so one accumulator per kind of statistic serves them all
    (q/k/v share one Hessian, gate/up another): the same numbers for a fraction of the products."""
    for members in shared_within:
        owners: dict[object, object] = {}
        for name in members:
            stat = stats[name]
            key = stat.share_key() if hasattr(stat, "share_key") else None
            if key is None:
                continue
            if key in owners:
                stats[name] = owners[key]
            else:
                owners[key] = stat
    return stats


def collect_stats(model: nn.Module, block: nn.Module, make_stats: MakeStats, group: list[str],
                  inputs: list[BlockInput], device: torch.device, *, stop_early: bool,
                  shared_within: list[list[str]] | None = None) -> dict[str, object]:
    """Feed each layer's calibration inputs to its statistics, one forward per calibration batch.

    With ``stop_early`` the forward ends at the group's last layer (before it computes), so the q/k/v
    group costs a norm rather than a whole block, and only the last group runs (almost) all of it.
    ``shared_within``: the sets of layers known to read one tensor (default: the whole ``group``)."""
    stats = {name: make_stats(name, model.get_submodule(name)) for name in group}
    if all(stat is None for stat in stats.values()):  # the pass collects nothing (e.g. a data-free group step)
        return stats
    share_stats(stats, shared_within if shared_within is not None else [group])
    pending: set[str] = set()
    handles = []
    fed: set[int] = set()
    for name, stat in stats.items():
        if stat is not None and id(stat) in fed:
            stat = None  # an alias: its owner is fed from the same input
        elif stat is not None:
            fed.add(id(stat))

        def hook(module, args, stat=stat, name=name):
            if stat is not None:
                stat.add_batch(args[0].detach())
            if stop_early:
                pending.discard(name)
                if not pending:
                    raise _GroupSeen

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for item in inputs:
            pending.update(group)
            try:
                block_output(block, item.to(device))
            except _GroupSeen:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return stats


def folds_exactly(block: nn.Module, sample: BlockInput, device: torch.device, group: Group) -> bool:
    """Whether folding a random positive scale into ``group`` (producer output · s, reader inputs · 1/s)
    leaves the block's output on ``sample`` unchanged; the weights are restored exactly either way.

    The check a learned producer must pass: a forward shows which norm's output a group reads, not where
    else that output goes (a post-norm block adds it to the residual stream, where no reader compensates)."""
    assert group.producer is not None
    params = [p for p in (getattr(group.producer.module, "weight", None), getattr(group.producer.module, "bias", None))
              if isinstance(p, Tensor)] + [layer.weight for layer in group.layers]
    saved = [p.data.clone() for p in params]
    item = sample.to(device)
    before = block_output(block, item).float()
    scale = torch.empty(group.producer.channels).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
    try:
        fold_scale_(group, scale)
        after = block_output(block, item).float()
    finally:
        for p, value in zip(params, saved, strict=True):
            p.data.copy_(value)
    tolerance = 1e-3 if params[0].dtype == torch.float32 else 3e-2
    return bool((after - before).norm() <= tolerance * before.norm().clamp_min(1e-12))


def free_stats(stats: dict[str, object]) -> None:
    """After the whole group: members may share one accumulator, so each is freed once."""
    for stat in {id(s): s for s in stats.values() if s is not None}.values():
        if hasattr(stat, "free"):
            stat.free()
