"""Capture what block 0 receives: hidden states plus every positional and keyword argument.

The architecture computes masks, position ids and rotary embeddings before its first block; rather than
re-deriving them per family, we run the real forward and stop it at block 0 (the "Catcher" idea of the
GPTQ reference), recording the arguments exactly as the model passes them. Caches are turned off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class BlockInput:
    """One calibration batch at a block boundary: ``block(*args, **kwargs)``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def to(self, device: torch.device) -> BlockInput:
        return BlockInput(tuple(_to(a, device) for a in self.args), {k: _to(v, device) for k, v in self.kwargs.items()})

    @property
    def hidden(self) -> Tensor:
        return self.args[0]

    def with_hidden(self, hidden: Tensor) -> BlockInput:
        return BlockInput((hidden, *self.args[1:]), self.kwargs)

    def copy(self) -> BlockInput:
        """Every tensor cloned: made outside inference mode, the copies are ordinary tensors that autograd may
        save for backward (a block-output reconstruction differentiates through masks and rotary tables)."""
        return BlockInput(tuple(_map(a, Tensor.clone) for a in self.args),
                          {k: _map(v, Tensor.clone) for k, v in self.kwargs.items()})


def _to(value: Any, device: torch.device) -> Any:
    return _map(value, lambda tensor: tensor.to(device))


def _map(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map(v, fn) for v in value)
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


class _Stop(Exception):
    """Raised by the catcher once block 0's inputs are recorded: the rest of the forward is not needed."""


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module, sink: list[BlockInput]) -> None:
        super().__init__()
        self.block = block
        self.sink = sink

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "hidden_states" in kwargs and not args:  # some families pass everything by keyword
            args = (kwargs.pop("hidden_states"),)
        kwargs = {k: v for k, v in kwargs.items() if k not in {"past_key_value", "past_key_values", "layer_past"}}
        self.sink.append(BlockInput(args, kwargs))
        raise _Stop

    def __getattr__(self, name: str) -> Any:  # attributes the model reads off its blocks (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


@contextmanager
def outside_blocks_on(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Move everything but the blocks (embeddings, rotary, final norm) to ``device`` for the capture."""
    moved: list[tuple[nn.Module, torch.device]] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if child is blocks:
                continue
            has_block = any(m is blocks for m in child.modules())
            if has_block:
                visit(child)
                continue
            home = next((t.device for t in [*child.parameters(), *child.buffers()]), None)
            if home is not None and home != device:
                moved.append((child, home))
                child.to(device)
        for name, param in module.named_parameters(recurse=False):
            if param.device != device:
                module._parameters[name] = nn.Parameter(param.data.to(device), requires_grad=False)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)

    visit(model)
    try:
        yield
    finally:
        for child, home in moved:
            child.to(home)


FORWARD_TOKENS = 4096
"""Calibration tokens run through a block in one forward. Small enough that a batch's activations (and an
eager attention's scores) stay a few hundred MB on real models; large enough that per-op overhead, which
dominates one-sample forwards of small models on a CPU, is paid once per batch instead of per sample."""


def forward_batch_size(num_samples: int, seq_len: int, token_budget: int = FORWARD_TOKENS) -> int:
    """Samples per calibration forward: as many as fit in ``token_budget`` tokens, at least one.

    A pure function of the recipe's calibration shape, so a resumed run batches exactly as the
    interrupted one did (the saved hidden states are per batch)."""
    return max(1, min(num_samples, token_budget // max(seq_len, 1)))


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: Tensor, *, device: torch.device,
                         offload: torch.device | None = None, batch_size: int = 1,
                         progress: Callable[[str, int, int], None] | None = None) -> list[BlockInput]:
    """Block 0's inputs for every calibration batch, stored on ``offload`` (default: the CPU)."""
    store = offload or torch.device("cpu")
    sink: list[BlockInput] = []
    first = blocks[0]
    blocks[0] = _Catcher(first, sink)
    total = input_ids.shape[0]
    try:
        with outside_blocks_on(model, blocks, device), torch.inference_mode():
            for start in range(0, total, batch_size):
                batch = input_ids[start:start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
                sink[-1] = sink[-1].to(store)
                if progress is not None:
                    progress("capture inputs", min(start + batch_size, total), total)
    finally:
        blocks[0] = first
    if len(sink) != (total + batch_size - 1) // batch_size:
        raise RuntimeError("the model did not call its first block once per batch; cannot capture its inputs")
    return sink


def block_output(block: nn.Module, item: BlockInput) -> Tensor:
    """Run one block on a captured input; the new hidden states whatever the family returns."""
    out = block(*item.args, **item.kwargs)
    if isinstance(out, tuple):
        return out[0]
    return out
