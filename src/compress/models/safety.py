"""Validate a checkpoint folder before any weight is read: shard indexes and safetensors headers.

Why before: a checkpoint is untrusted input. A shard index that names ``../../x`` or ``/etc/x`` would
make a loader read (and report on) files outside the folder the user pointed at; a safetensors header
that lies about its length or offsets is found by the Rust reader only at the first ``get_tensor``,
which may be deep inside a long run where it surfaces as an internal error. Checking these few
kilobytes up front turns every such file into one ``CompressError`` sentence naming the file.

Used by the model loader (``compress.models.load``) and by ``compress.load`` / ``compress inspect``.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from compress.core.errors import CompressError

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
_ITEM_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
              "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "I64": 64, "U64": 64, "F64": 64, "C64": 64}


def _index_entry(index: Path, name: object) -> str:
    """A shard file name from an index: one plain name inside the folder, never a path."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or "\0" in name:
        raise CompressError(f"shard index {index} names {name!r}, which is not a file inside the checkpoint")
    if name in (".", "..") or Path(name).is_absolute():
        raise CompressError(f"shard index {index} names {name!r}, which is not a file inside the checkpoint")
    return name


def check_shard_index(folder: Path, index_name: str = INDEX_NAMES[0]) -> list[Path] | None:
    """The shard files an index lists (checked to be plain names inside ``folder`` and present);
    None when there is no such index."""
    index = folder / index_name
    if not index.exists():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CompressError(f"shard index {index} is not valid JSON") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CompressError(f"shard index {index} has no weight_map")
    names = sorted({_index_entry(index, name) for name in weight_map.values()})
    for name in names:
        if not (folder / name).is_file():
            raise CompressError(f"shard {name} listed in {index.name} is missing from {folder}")
    return [folder / name for name in names]


def check_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Parse and check one safetensors header without reading tensor data: {name: (dtype, shape)}.

    Checked: the length prefix fits the file, the header is a JSON object, every entry has a known
    dtype, a shape of non-negative ints and data offsets that lie inside the data section and match
    the shape's byte size, with no two tensors overlapping.
    """
    what = f"weights file {path.name}"
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CompressError(f"{what} is too short to be safetensors")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise CompressError(f"{what} is corrupt or truncated (its header claims {length} bytes)")
            raw = handle.read(length)
    except OSError as error:
        raise CompressError(f"{what} cannot be read ({error.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CompressError(f"{what} has a corrupt header (not JSON)") from None
    if not isinstance(header, dict):
        raise CompressError(f"{what} has a corrupt header (not a JSON object)")
    data_bytes = size - 8 - length
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, tuple[str, list[int]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise CompressError(f"{what} has corrupt metadata (values must be strings)")
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if dtype not in _ITEM_BITS:
            raise CompressError(f"{what}: tensor {name} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise CompressError(f"{what}: tensor {name} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise CompressError(f"{what}: tensor {name} has invalid data offsets {offsets!r}")
        start, end = offsets
        expected = math.ceil(math.prod(shape) * _ITEM_BITS[dtype] / 8)
        if not 0 <= start <= end <= data_bytes:
            raise CompressError(f"{what}: tensor {name} lies outside the file (truncated or corrupt)")
        if end - start != expected:
            raise CompressError(f"{what}: tensor {name} holds {end - start} bytes, but {dtype} {shape} needs {expected}")
        spans.append((start, end, name))
        tensors[name] = (dtype, shape)
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise CompressError(f"{what}: tensors {first} and {second} overlap (corrupt file)")
    return tensors


def check_checkpoint_folder(folder: Path) -> list[Path]:
    """Every shard index and safetensors header of ``folder``, checked; returns the safetensors files
    to read (the index's, or every ``*.safetensors``)."""
    listed = check_shard_index(folder)
    check_shard_index(folder, INDEX_NAMES[1])  # the pickle index is only read with --allow-pickle; check it anyway
    present = sorted(folder.glob("*.safetensors"))
    for file in sorted({*(listed or []), *present}):  # a stray shard beside an index is still read by globbing loaders
        check_safetensors_header(file)
    return listed if listed is not None else present
