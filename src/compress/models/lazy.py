"""Load a model so that each block's weights are read from disk only when the sweep reaches it.

The architecture is built without initialising its weights: large ``torch.empty`` allocations are backed
by pages the OS only provides when written, so an unloaded block costs (almost) no resident memory.
Everything outside the blocks (embeddings, final norm, lm_head) is read at once; each block is read from
the memory-mapped safetensors right before it is compressed, and its dense Linear weights are freed when
the compressed modules replace them. Peak memory therefore follows the largest block, not the depth.

Checkpoints this cannot map exactly (other key layouts, GPT-2 style Conv1D, remote hub ids) fall back to
the ordinary eager transformers load, which is always correct but holds the whole model in memory.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from compress.core.errors import CompressError


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name → the shard holding it (headers only)."""
    where: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                where[key] = file
    return where


def _tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """Each state-dict name → every name sharing its tensor (tied embeddings)."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id[id(param)].append(name)
    return {name: names for names in by_id.values() for name in names}


def _key_map(model: nn.Module, checkpoint_keys: set[str]) -> dict[str, str] | None:
    """Model state-dict name → checkpoint name, trying the base-model prefix both ways; None if incomplete."""
    model_keys = list(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = _tied_groups(model)
    candidates = [lambda k: k]
    if prefix:
        candidates += [lambda k: k[len(prefix) + 1:] if k.startswith(prefix + ".") else k,
                       lambda k: f"{prefix}.{k}"]
    for translate in candidates:
        mapping: dict[str, str] = {}
        for key in model_keys:
            for alias in tied.get(key, [key]):
                if translate(alias) in checkpoint_keys:
                    mapping[key] = translate(alias)
                    break
        if len(mapping) == len(model_keys):
            return mapping
    return None


@dataclass
class LazyWeights:
    """Where each of the model's tensors lives on disk, and a way to read a submodule's share of them."""

    model: nn.Module
    key_map: dict[str, str]
    files: dict[str, Path]

    def _read(self, keys: list[str]) -> None:
        state = self.model.state_dict(keep_vars=True)
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.files[self.key_map[key]]].append(key)
        with torch.no_grad():
            for file, names in by_file.items():
                with safe_open(str(file), framework="pt") as handle:
                    for key in names:
                        tensor = handle.get_tensor(self.key_map[key])
                        target = state[key]
                        if tuple(tensor.shape) != tuple(target.shape):
                            raise CompressError(f"tensor {self.key_map[key]} in {file.name} has shape "
                                                f"{list(tensor.shape)}, but the config implies {list(target.shape)}")
                        target.data.copy_(tensor)

    def load(self, prefix: str) -> None:
        """Read every tensor under module ``prefix`` (e.g. ``model.layers.3``) into the model, in place."""
        self._read([k for k in self.model.state_dict() if k.startswith(prefix + ".")])

    def load_outside(self, block_path: str) -> None:
        """Everything that is not a block: embeddings, norms, heads."""
        self._read([k for k in self.model.state_dict() if not k.startswith(block_path + ".")])


def build_lazy(model_class, config, folder: Path, dtype: torch.dtype, *,
               trust_remote_code: bool = False) -> tuple[nn.Module, LazyWeights] | None:
    """The model with no weights read yet, and its map to the checkpoint; None when it cannot be mapped."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    from transformers.pytorch_utils import Conv1D

    files = _checkpoint_files(folder)
    if not files:
        return None
    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    with no_init_weights(), _default_dtype(dtype):
        # from_config follows config.dtype over the default dtype, so the asked-for dtype is passed too
        # (and enforced below): without it --dtype bfloat16 streamed an fp32 model and wrote fp32 bytes
        model = model_class.from_config(config, dtype=dtype, **kwargs)
    for param in model.parameters():  # buffers (rotary inv_freq) keep the dtype transformers gives them
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    if any(isinstance(m, Conv1D) for m in model.modules()):
        return None
    mapping = _key_map(model, set(files))
    if mapping is None:
        return None
    return model.eval(), LazyWeights(model, mapping, files)
