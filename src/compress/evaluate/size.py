"""Sizes: bytes on disk, logical parameter counts, and where the bytes of a checkpoint go.

The compression ratio we report is bytes of weights on disk, baseline over compressed, because that is
what a user downloads and loads; tokenizer and config files are the same on both sides and only blur it.
The breakdown reads safetensors headers only, so it costs nothing on a 70B checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from compress.codecs import Codec, all_codecs
from compress.core.errors import CompressError
from compress.export.adapter import ADAPTER_DIR
from compress.export.adapter import ADAPTER_WEIGHTS as ADAPTER_FILE

QUANTIZED = "quantized weights"
QPARAMS = "scales/zeros"
DENSE = "dense"
LOWRANK = "lowrank"
"""Low-rank compensation factors (the ``lowrank/`` PEFT adapter beside the shards, ``export.adapter``)."""
ADAPTER_WEIGHTS = (ADAPTER_DIR, ADAPTER_FILE)
"""Where that adapter's tensors are, relative to the model folder."""

# safetensors header dtype names (get_dtype()) and torch spellings, to bytes per element.
_DTYPE_BYTES: dict[str, float] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}  # fmt: skip


def _weight_files(path: Path) -> list[Path]:
    """Weight files in a model folder; ``training_args.bin`` is a pickled config, not weights. The low-rank
    compensation adapter (``lowrank/adapter_model.safetensors``) is part of the model: it counts."""
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    adapter = path.joinpath(*ADAPTER_WEIGHTS)
    return [f for f in files if f.name != "training_args.bin"] + ([adapter] if adapter.is_file() else [])


def dir_size_bytes(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``) in a model folder.

    Raises CompressError when there are none: a ratio against zero bytes would be a silent lie.
    """
    path = Path(path)
    if not path.is_dir():
        raise CompressError(f"{path} is not a directory")
    files = _weight_files(path)
    if not files or files == [path.joinpath(*ADAPTER_WEIGHTS)]:
        raise CompressError(f"no weight files (*.safetensors, *.bin) in {path}")
    return sum(f.stat().st_size for f in files)


def parameter_count(model: nn.Module) -> int:
    """Logical parameters: what the uncompressed model had, so counts compare across methods.

    A module carrying a ``weight_shape`` buffer (QuantLinear) counts out*in from it plus its bias, not
    the packed storage; everything else counts the numel of its parameters. Tied parameters and shared
    modules count once.
    """
    seen: set[int] = set()
    total = 0
    quantized: set[int] = set()
    for module in model.modules():
        shape = module._buffers.get("weight_shape")
        if shape is not None:
            quantized.add(id(module))
            total += math.prod(int(d) for d in shape.flatten().tolist())
            bias = getattr(module, "bias", None)
            if bias is not None and id(bias) not in seen:
                seen.add(id(bias))
                total += bias.numel()
            seen.update(id(p) for p in module.parameters(recurse=False))
    for module in model.modules():
        if id(module) in quantized:
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def stored_layers(names: Iterable[str]) -> dict[str, Codec]:
    """Layer prefix → the registered codec whose layout stores it, from tensor names alone (the first codec
    in registration order that claims the layer: ``naive-quantized`` and ``float-quantized`` store the same
    leaves, and both count codes and scales alike)."""
    names = set(names)
    found: dict[str, Codec] = {}
    for codec in all_codecs():
        for prefix in codec.layers(names):
            found.setdefault(prefix, codec)
    return found


def weights_bytes_by_component(tensors_meta: Mapping[str, tuple[str, list[int]]],
                               codecs: Mapping[str, Codec] | None = None) -> dict[str, int]:
    """Bytes grouped into quantized weights, their scales/zeros/indices, and everything left dense (plus
    ``lowrank``, the compensation factors, when ``tensors_meta`` names adapter tensors: ``lowrank_header_meta``).

    Each stored layer's codec (``codecs``: prefix → codec, found from the tensor names when not given) says
    which of its leaves hold codes (the quantized weights, or the kept values of a sparse layer, which count
    as dense) and which hold scales, zeros and indices; every other tensor is dense. All three keys are always
    present so reports have a stable shape. Element sizes below a byte (F4) are rounded up per tensor, as
    safetensors stores them."""
    if codecs is None:
        codecs = stored_layers(tensors_meta)
    out = {QUANTIZED: 0, QPARAMS: 0, DENSE: 0}
    for name, (dtype, shape) in tensors_meta.items():
        if name.startswith(LOWRANK_PREFIX):
            out.setdefault(LOWRANK, 0)
        key = str(dtype).removeprefix("torch.")
        if key not in _DTYPE_BYTES:
            raise CompressError(f"tensor {name} has an unknown dtype {dtype!r}")
        size = math.ceil(math.prod(shape) * _DTYPE_BYTES[key])
        prefix, _, leaf = name.rpartition(".")
        codec = codecs.get(prefix)
        if name.startswith(LOWRANK_PREFIX):
            out[LOWRANK] += size
        elif codec is not None and leaf in codec.code_leaves:
            out[QUANTIZED if codec.quantized else DENSE] += size
        elif codec is not None and leaf in codec.leaves:
            out[QPARAMS] += size
        else:  # dense layers, norms, embeddings, and a stored layer's bias
            out[DENSE] += size
    return out


LOWRANK_PREFIX = "lowrank/"
"""How ``lowrank_header_meta`` prefixes the adapter's tensor names (no checkpoint tensor name has a slash)."""


def lowrank_header_meta(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """``{"lowrank/<tensor>": (dtype, shape)}`` of the compensation adapter's file; empty without one. Merge it
    into ``safetensors_header_meta`` to have ``weights_bytes_by_component`` count the factors."""
    file = Path(path).joinpath(*ADAPTER_WEIGHTS)
    if not file.is_file():
        return {}
    try:
        with safe_open(str(file), framework="pt") as fh:
            return {LOWRANK_PREFIX + n: (fh.get_slice(n).get_dtype(), list(fh.get_slice(n).get_shape()))
                    for n in fh.keys()}  # noqa: SIM118
    except SafetensorError as exc:
        raise CompressError(f"{file} is not a readable safetensors file: {exc}") from exc


def safetensors_header_meta(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """``{tensor_name: (dtype, shape)}`` for every ``*.safetensors`` file in a folder, from headers only."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise CompressError(f"no *.safetensors files in {path}")
    meta: dict[str, tuple[str, list[int]]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():
                    if name in meta:
                        raise CompressError(f"tensor {name} appears in more than one shard of {path}")
                    sl = fh.get_slice(name)
                    meta[name] = (sl.get_dtype(), list(sl.get_shape()))
        except SafetensorError as exc:
            raise CompressError(f"{file} is not a readable safetensors file: {exc}") from exc
    return meta
