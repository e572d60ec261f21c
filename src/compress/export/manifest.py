"""``manifest.json``: what is in an output folder and how it was made, so an artifact can be audited.

Hashed content only (no timestamps, no host names): the same recipe on the same inputs writes the same
manifest. Wall-clock timings are reported on stdout / ``--json`` instead. ``layers`` lists what was done
to each layer, from its record (``LayerRecord.summary``: the methods chain, the scheme in words, observer,
act-order, sparsity pattern, weight error to 6 digits), in the sweep's order.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from compress.core.errors import CompressError

MANIFEST_NAME = "manifest.json"
TOOL_NAME = "compress-toolkit"
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
                   evaluation: dict | None, layers: list[dict[str, Any]] | None = None) -> Path:
    """``layers``: the per-layer records' summaries (left out of the manifest when None: nothing known)."""
    manifest = {
        "tool": {"name": TOOL_NAME, "version": tool_version()},
        "libraries": library_versions(),
        "source_model": source_model,
        "recipe": recipe,
        "calibration": calibration,
        "eval": evaluation,
        **({} if layers is None else {"layers": layers}),
        "files": file_hashes(folder),
    }
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder``; CompressError (bad input, exit 2) when it is absent or unreadable."""
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise CompressError(f"{folder} is not a folder")
    if not path.is_file():
        raise CompressError(f"{folder} has no {MANIFEST_NAME}, so there is nothing to verify against")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CompressError(f"{path} is not a readable JSON manifest") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CompressError(f"{path} has no 'files' table of hashes")
    return data


def our_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder`` when this toolkit wrote it (its ``tool.name`` and a ``files`` table), else
    None: how ``--overwrite`` tells a previous output of ours from any other folder (a file merely named
    manifest.json is not enough)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    tool = data.get("tool")
    return data if isinstance(tool, dict) and tool.get("name") == TOOL_NAME else None


def _listed_path(folder: Path, rel: str) -> Path | None:
    """A manifest entry as a path inside ``folder``; None when it is absolute or climbs out (never read)."""
    candidate = Path(rel)
    if not rel or candidate.is_absolute() or ".." in candidate.parts or "\\" in rel:
        return None
    return folder / candidate


def verify_manifest(folder: Path) -> list[dict[str, str]]:
    """Re-hash every file and compare with the manifest: one problem per missing, changed or extra file.

    Why also extra files: a file slipped into a release folder after it was made (a pickle, a script) is
    as much a change to the artifact as an edited one. Entries that point outside the folder are never
    read; they are reported as problems of the manifest itself.
    """
    folder = Path(folder)
    listed = read_manifest(folder)["files"]
    problems: list[dict[str, str]] = []
    for rel in sorted(listed):
        entry = listed[rel]
        path = _listed_path(folder, rel)
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if path is None:
            problems.append({"file": rel, "problem": "outside", "message": f"manifest entry {rel!r} points outside the folder"})
        elif not isinstance(expected, str):
            problems.append({"file": rel, "problem": "malformed", "message": f"manifest entry {rel} has no sha256"})
        elif path.is_symlink() or not path.is_file():
            problems.append({"file": rel, "problem": "missing", "message": f"{rel} is listed in the manifest but missing"})
        elif sha256_file(path) != expected:
            problems.append({"file": rel, "problem": "changed",
                             "message": f"{rel} does not match its sha256 in the manifest (changed since it was written)"})
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME or rel in listed or path.is_dir():
            continue
        problems.append({"file": rel, "problem": "extra", "message": f"{rel} is not listed in the manifest (added later)"})
    return problems
