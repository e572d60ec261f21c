"""``manifest.json``: what is in an output folder and how it was made, so an artifact can be audited.

Hashed content only (no timestamps, no host names): the same recipe on the same inputs writes the same
manifest. Wall-clock timings are reported on stdout / ``--json`` instead.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
_LIBRARIES = ("torch", "transformers", "safetensors", "datasets", "compressed-tensors")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tool_version() -> str:
    try:
        return metadata.version("compress-toolkit")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``folder`` except the manifest itself, by relative path."""
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME:
            continue
        entries[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def write_manifest(folder: Path, *, source_model: str, recipe: dict, calibration: dict | None,
                   evaluation: dict | None) -> Path:
    manifest = {
        "tool": {"name": "compress-toolkit", "version": tool_version()},
        "libraries": library_versions(),
        "source_model": source_model,
        "recipe": recipe,
        "calibration": calibration,
        "eval": evaluation,
        "files": file_hashes(folder),
    }
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path
