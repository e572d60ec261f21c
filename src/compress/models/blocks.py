"""Where the compressible layers of a model live: the one place that knows about architectures.

Passes see ``nn.Linear`` and tensors only, so everything family-specific is answered here, and answered
generically: the decoder/encoder blocks are the longest ``ModuleList`` of same-type modules that hold Linear
layers (``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ``model.decoder.layers``, ``encoder.layer``...).
No per-model table, so a new family usually works without a change here. GPT-2 style ``Conv1D`` modules are
turned into ``nn.Linear`` first, so that passes never meet a transposed weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from compress.core.errors import CompressError
from compress.core.targets import matches_any

__all__ = ["convert_conv1d_to_linear", "find_blocks", "find_linears", "select_layers", "plan_layers"]

CONV1D_MARK = "_compress_from_conv1d"


def _linear_from_conv1d(conv: Conv1D) -> nn.Linear:
    """Same function, Linear layout: Conv1D stores [in, out] and computes x @ W + b; Linear stores [out, in]."""
    w = conv.weight
    linear = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    if w.device.type != "meta":
        with torch.no_grad():
            linear.weight.copy_(w.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
    linear.weight.requires_grad_(w.requires_grad)
    setattr(linear, CONV1D_MARK, True)  # the exporter writes it back as [in, out] when it stays dense
    return linear


def convert_conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` with an equivalent ``nn.Linear`` in place; returns their names."""
    converted: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _linear_from_conv1d(module))
        converted.append(name)
    return converted


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, Conv1D)) for m in module.modules())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the ModuleList of the repeated blocks that the layer-wise sweep walks.

    Candidates are ModuleLists whose items share one type and contain Linear layers. Lists nested inside
    another candidate (MoE experts, per-head projections) are skipped, so the outer stack wins; among the
    rest the longest wins, ties going to the first in module order.
    """
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer, _ in candidates):
            continue
        if len({type(m) for m in module}) == 1 and _has_linear(module[0]):
            candidates.append((name, module))
    if not candidates:
        raise CompressError(
            f"cannot find the repeated transformer blocks in {type(model).__name__}: no list of identical "
            "modules holding Linear layers"
        )
    return max(candidates, key=lambda c: len(c[1]))  # max keeps the first of equals


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """All ``nn.Linear`` submodules by full dotted name (``prefix`` prepended), in ``named_modules`` order."""
    return {
        (f"{prefix}.{name}" if prefix and name else prefix or name): m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
    }


def select_layers(model: nn.Module, ignore: Sequence[str] = ("lm_head",)) -> list[str]:
    """Full names of the Linear layers to compress: every one inside the blocks, minus ``ignore`` patterns.

    The LM head and embeddings are never inside the blocks, so they stay dense by default. Call
    ``convert_conv1d_to_linear`` first (``load_model`` does): Conv1D layers are not ``nn.Linear``.
    """
    path, blocks = find_blocks(model)
    names: list[str] = []
    for i, block in enumerate(blocks):
        names.extend(
            n for n in find_linears(block, f"{path}.{i}" if path else str(i)) if not matches_any(n, ignore)
        )
    return names


def plan_layers(
    config, ignore: Sequence[str] = ("lm_head",), *, trust_remote_code: bool = False
) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of the layers a run would touch, without reading any weights.

    The model is built on the meta device, so this costs no memory and works for any size: it is what
    ``--dry-run`` prints.
    """
    from compress.models.load import instantiate_from_config  # load.py imports this module at call time too

    with torch.device("meta"):
        model = instantiate_from_config(config, trust_remote_code=trust_remote_code)
    convert_conv1d_to_linear(model)
    linears = find_linears(model)
    return [(n, linears[n].in_features, linears[n].out_features) for n in select_layers(model, ignore)]
