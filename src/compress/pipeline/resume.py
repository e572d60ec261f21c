"""``--resume``: a block sweep that survives Ctrl-C, a kill or a power cut, and continues where it stopped.

Why per block: the sweep is the long part of a run and its state at a block boundary is small and exact:
the compressed block's tensors and the hidden states the next block will be fed. After each completed
block we write both (safetensors, bit-exact) and then, last, ``progress.json`` (atomically replaced), so a
crash at any moment leaves either the previous consistent state or the new one. The other arguments a
block receives (masks, rotary embeddings) are recomputed by the block-0 capture on resume, which runs
only the embeddings. A resumed run therefore feeds every remaining block the same bytes as an
uninterrupted one and writes the same artifact.

The state is only trusted for the same job: the sha256 of the recorded recipe and the calibration
fingerprint must match, otherwise the run stops with one sentence (exit 2) rather than mixing two jobs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compress.codecs import CODECS, StorageCodec
from compress.codecs.pack_quantized import PACK_QUANTIZED
from compress.core.errors import CompressError
from compress.core.records import LayerRecord
from compress.core.scheme import QuantScheme
from compress.kernels.quant_linear import QuantLinear
from compress.pipeline.output_dir import PROGRESS_NAME
from compress.pipeline.sequential import swap_module

_VERSION = 2
"""2: the layer records are ``LayerRecord.to_dict`` (scheme, observer, actorder, sparsity); 1 held the report
entries only, and its modules carried those facts as attributes."""


SWEEP_FIELDS = ("model", "dtype", "device", "trust_remote_code", "allow_pickle", "calibration", "stages")
"""The recipe fields the saved blocks depend on. Export and eval settings are left out on purpose: they are
redone after the sweep from the current recipe, so fixing e.g. a wrong eval dataset keeps the blocks."""


def recipe_hash(recipe: dict[str, Any]) -> str:
    """sha256 of the recipe fields that decide the sweep (``SWEEP_FIELDS``), key order irrelevant."""
    decisive = {key: recipe.get(key) for key in SWEEP_FIELDS}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    """Plain values set on a module before the sweep (``models.blocks.CONV1D_MARK``), which the export reads."""
    return {k: v for k, v in vars(module).items()
            if k != "training" and not k.startswith("__") and isinstance(v, (str, int, float, bool))}


def describe(module: nn.Module) -> dict[str, Any] | None:
    """How to rebuild ``module`` (its tensors are saved separately); None for a type we cannot. A quantized
    layer is named by its codec (``format``) and its scheme as a compressed-tensors config group."""
    if isinstance(module, QuantLinear):
        return {"type": "QuantLinear", "format": module.format, "scheme": module.scheme.to_config_group([]),
                "in": module.in_features, "out": module.out_features, "bias": module.bias is not None,
                "scale_dtype": str(module.weight_scale.dtype), "attrs": _plain_attrs(module)}
    if type(module) is nn.Linear:
        return {"type": "Linear", "in": module.in_features, "out": module.out_features,
                "bias": module.bias is not None, "dtype": str(module.weight.dtype), "attrs": _plain_attrs(module)}
    return None


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise CompressError(f"resume state names an unknown dtype {name!r}")
    return value


def rebuild(desc: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, prefix: str = "") -> nn.Module:
    """The module ``desc`` describes. A quantized layer is rebuilt by its codec from the saved block tensors
    (``tensors``, names relative to the block; ``prefix`` the layer's name there), so the saved state is
    validated like a checkpoint; without tensors an empty module of the right layout is built."""
    if desc["type"] == "QuantLinear":
        codec = CODECS.get(desc.get("format", PACK_QUANTIZED.name))
        if not isinstance(codec, StorageCodec):
            raise CompressError(f"resume state holds a quantized layer in {codec.name}, which stores no codes")
        scheme = QuantScheme.from_config_group(desc["scheme"]) if "scheme" in desc \
            else QuantScheme(desc["bits"], desc["group_size"], desc["symmetric"])  # states written before codecs
        if tensors is not None:
            module: nn.Module = codec.rebuild(prefix, tensors, scheme, tensors.get(f"{prefix}.bias"))
        else:
            module = QuantLinear(desc["in"], desc["out"], scheme, bias=desc["bias"], has_g_idx=desc.get("g_idx", False),
                                 scale_dtype=_dtype(desc["scale_dtype"]), layout=codec.storage_cls,
                                 format=codec.name)
    elif desc["type"] == "Linear":
        module = nn.Linear(desc["in"], desc["out"], bias=desc["bias"], dtype=_dtype(desc["dtype"]),
                           device="meta")
    else:
        raise CompressError(f"resume state holds a layer of unknown type {desc['type']!r}")
    for key, value in desc.get("attrs", {}).items():
        setattr(module, key, value)
    return module


@dataclass
class Restored:
    """What a resumed sweep starts from: blocks before ``start_block`` are already compressed in the model."""

    start_block: int
    results: list[LayerRecord]
    hidden: list[torch.Tensor] | None  # inputs of block ``start_block`` (None: data-free passes)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class SweepCheckpoint:
    """The resumable state of one run, in its stable partial folder (see ``output_dir.staging_dir``)."""

    def __init__(self, folder: Path, recipe_sha256: str) -> None:
        self.folder = folder
        self.recipe_sha256 = recipe_sha256
        self.fingerprint: str | None = None
        self.state: dict[str, Any] = {}
        self.enabled = True
        path = folder / PROGRESS_NAME
        if path.is_file():
            try:
                self.state = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise CompressError(f"the resume state {path} is unreadable; delete {folder} to start over") from None
            if not isinstance(self.state, dict) or self.state.get("version") != _VERSION:
                raise CompressError(f"the resume state {path} is from another version; delete {folder} to start over")
            if self.state.get("recipe_sha256") != recipe_sha256:
                raise CompressError(f"the interrupted run in {folder} was made by a different recipe, so --resume "
                                    "cannot continue it; run the same recipe, or delete that folder to start over")

    @property
    def completed(self) -> int:
        return int(self.state.get("completed_blocks", 0))

    def check_calibration(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        if self.state and self.state.get("calibration_fingerprint") != fingerprint:
            raise CompressError(f"the interrupted run in {self.folder} was calibrated on different data, so --resume "
                                "cannot continue it; restore the data, or delete that folder to start over")

    def restore(self, model: nn.Module, blocks: nn.ModuleList) -> Restored | None:
        """Swap the saved compressed modules of every completed block into ``model``; None when nothing saved."""
        if not self.completed:
            return None
        try:
            prefixes = {id(m): n for n, m in model.named_modules()}
            for index in range(self.completed):
                entry = self.state["blocks"][str(index)]
                saved = load_file(str(self.folder / entry["file"]))
                block_prefix = prefixes[id(blocks[index])] + "."
                for name, desc in entry["modules"].items():
                    swap_module(model, name, rebuild(desc, saved, name.removeprefix(block_prefix)))
                blocks[index].load_state_dict(saved, strict=True, assign=True)
            hidden = None
            if self.state.get("inputs"):
                saved = load_file(str(self.folder / self.state["inputs"]))
                hidden = [saved[f"hidden.{i}"] for i in range(len(saved))]
        except (KeyError, TypeError, OSError, RuntimeError, SafetensorError) as error:
            raise CompressError(f"the resume state in {self.folder} is incomplete ({type(error).__name__}); "
                                "delete that folder to start over") from None
        results = [LayerRecord.from_dict(r) for r in self.state.get("results", [])]
        return Restored(self.completed, results, hidden)

    def save(self, index: int, model: nn.Module, block: nn.Module, results: list[LayerRecord],
             hidden: list[torch.Tensor] | None) -> None:
        """Record block ``index`` as done (its tensors, the next block's inputs), then progress.json last."""
        if not self.enabled:
            return
        modules = {}
        for result in results:
            desc = describe(model.get_submodule(result.name))
            if desc is None:  # a layer type this version cannot rebuild: stop saving, keep what is consistent
                self.enabled = False
                logging.getLogger("compress").warning(
                    "--resume cannot save layers of type %s; later blocks are not checkpointed",
                    type(model.get_submodule(result.name)).__name__)
                return
            modules[result.name] = desc
        file = f"block-{index:05d}.safetensors"
        _save_tensors(block.state_dict(), self.folder / file)
        inputs = None
        if hidden is not None:
            inputs = f"inputs-{index + 1:05d}.safetensors"
            _save_tensors({f"hidden.{i}": h for i, h in enumerate(hidden)}, self.folder / inputs)
        previous = self.state.get("inputs")
        blocks = {**self.state.get("blocks", {}), str(index): {"file": file, "modules": modules}}
        self.state = {
            "version": _VERSION, "recipe_sha256": self.recipe_sha256, "calibration_fingerprint": self.fingerprint,
            "completed_blocks": index + 1, "blocks": blocks, "inputs": inputs,
            "results": [*self.state.get("results", []), *(r.to_dict() for r in results)],
        }
        _write_atomic(self.folder / PROGRESS_NAME, json.dumps(self.state, indent=1, sort_keys=True))
        if previous and previous != inputs:
            (self.folder / previous).unlink(missing_ok=True)


def open_checkpoint(partial: Path, recipe: dict[str, Any], resume: bool) -> SweepCheckpoint | None:
    """The checkpoint of a ``--resume`` run (refusing another job's state); None for an ordinary run."""
    return SweepCheckpoint(partial, recipe_hash(recipe)) if resume else None

