"""The block sweep: the one loop every layer-wise method runs in.

Blocks are visited in order; only the current block is moved to the compute device, so device memory is
bounded by one block. Passes that need calibration statistics get them through ``stats_hook`` (the GPTQ
issue adds the input capture and re-propagation); data-free passes such as RTN only need the walk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compress.core.errors import CompressError
from compress.passes.base import LayerPass

Progress = Callable[[str, int, int], None]


@dataclass
class LayerResult:
    """What a pass did to one layer, for the report."""

    name: str
    method: str
    scheme: str
    in_features: int
    out_features: int
    rel_weight_error: float | None


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def _relative_error(original: torch.Tensor, module: nn.Module) -> float | None:
    dequantized = getattr(module, "dequantized_weight", None)
    if dequantized is None:
        return None
    reference = original.float()
    denom = reference.norm().item()
    return (dequantized(torch.float32).to(reference.device) - reference).norm().item() / max(denom, 1e-12)


def check_layers(model: nn.Module, plan: Sequence[tuple[LayerPass, list[str]]]) -> None:
    """Every targeted layer accepts its pass; fails before any work is done."""
    for layer_pass, names in plan:
        if not names:
            raise CompressError(f"method {layer_pass.config.method} matched no linear layer (check --ignore)")
        for name in names:
            layer_pass.check_layer(name, model.get_submodule(name))


def run_layerwise(model: nn.Module, block_path: str, blocks: nn.ModuleList,
                  plan: Sequence[tuple[LayerPass, list[str]]], *, device: torch.device,
                  progress: Progress | None = None) -> list[LayerResult]:
    """Apply each pass to its layers, block by block, swapping in the modules the passes return."""
    results: list[LayerResult] = []
    for layer_pass, names in plan:
        if layer_pass.needs_calibration:
            raise CompressError(f"method {layer_pass.config.method} needs the calibrated sweep, "
                                "which this version does not have")
        by_block: dict[int, list[str]] = {}
        prefix = f"{block_path}."
        for name in names:
            if not name.startswith(prefix):
                raise CompressError(f"layer {name} is outside the blocks at {block_path}")
            index = int(name[len(prefix):].split(".", 1)[0])
            by_block.setdefault(index, []).append(name)
        total = len(blocks)
        for index, block in enumerate(blocks):
            home = next((p.device for p in block.parameters()), torch.device("cpu"))
            block.to(device)
            for name in by_block.get(index, []):
                linear = model.get_submodule(name)
                original = linear.weight.detach()
                replacement = layer_pass.apply(name, linear, None)
                results.append(LayerResult(
                    name=name, method=layer_pass.config.method, scheme=layer_pass.describe(),
                    in_features=linear.in_features, out_features=linear.out_features,
                    rel_weight_error=_relative_error(original, replacement),
                ))
                _swap(model, name, replacement)
            block.to(home)
            if progress is not None:
                progress(f"{layer_pass.config.method} blocks", index + 1, total)
    return results
