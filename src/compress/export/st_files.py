"""The sentence-transformers files of a source model, copied into its compressed output.

A sentence-transformers model is a transformers checkpoint plus a pipeline description: ``modules.json``
(the modules in order: Transformer, Pooling, Normalize, Dense, ...), ``config_sentence_transformers.json``,
the Transformer's ``sentence_*_config.json`` and one subfolder per further module (``1_Pooling/config.json``).
Without them ``SentenceTransformer(out)`` builds a plain mean-pooling model with a warning, or fails. We copy
exactly those: the root files by name and the module subfolders that ``modules.json`` lists, never a pickle
(``.bin``, ``.pt``, ...), never a symbolic link, never a path that leaves the source folder. A module folder's
own safetensors weights (a ``Dense`` layer) are copied as they are: they are part of the pipeline and are
not quantized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODULES_NAME = "modules.json"
_ROOT_FILES = ("config_sentence_transformers.json",)
_ROOT_PATTERN = "sentence_*_config.json"  # sentence_bert_config.json, sentence_roberta_config.json, ...
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".msgpack", ".h5"}


def _module_folders(source: Path) -> list[str]:
    """The relative, in-folder subfolder paths of the modules ``modules.json`` lists (the root one aside)."""
    try:
        modules = json.loads((source / MODULES_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return []
    if not isinstance(modules, list):
        return []
    root = source.resolve()
    folders = []
    for module in modules:
        rel = module.get("path") if isinstance(module, dict) else None
        if not isinstance(rel, str) or not rel or "\\" in rel:
            continue
        candidate = Path(rel)
        if candidate.is_absolute() or ".." in candidate.parts:
            continue
        path = source / candidate
        if path.is_symlink() or not path.is_dir() or root not in path.resolve().parents:
            continue
        folders.append(candidate.as_posix())
    return folders


def _copyable(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and path.suffix.lower() not in _PICKLE_SUFFIXES


def copy_sentence_transformers_files(source: str | Path, out_dir: Path) -> list[str]:
    """Copy the sentence-transformers files of the model folder ``source`` into ``out_dir``; returns their
    relative paths (none when ``source`` is not a sentence-transformers model or not a local folder)."""
    source = Path(source)
    if not source.is_dir() or not _copyable(source / MODULES_NAME):
        return []
    names = [MODULES_NAME, *_ROOT_FILES, *sorted(p.name for p in source.glob(_ROOT_PATTERN))]
    copied = []
    for name in dict.fromkeys(names):
        if _copyable(source / name):
            shutil.copyfile(source / name, out_dir / name)
            copied.append(name)
    root = source.resolve()
    for rel in _module_folders(source):
        for path in sorted((source / rel).rglob("*")):
            if not _copyable(path) or root not in path.resolve().parents:
                continue
            target = out_dir / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copied.append(path.relative_to(source).as_posix())
    return copied
