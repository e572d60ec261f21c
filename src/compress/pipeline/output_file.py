"""Single-file outputs (``compress export --format gguf``) that appear whole or not at all.

The file is written under a hidden temporary name beside the target (``.<name>.tmp-<pid>``, same folder, so
same file system) and renamed onto the target with ``os.replace`` only once it is complete: a failure, a bad
input found late, or Ctrl-C leaves no half-written file and never touches an existing one.

Before any work (``check_output_file``): the target must not be a folder, a symbolic link, or inside the
source checkpoint folder (a file added there would no longer match its manifest); an existing file is
replaced only with ``--overwrite`` and only when it starts with ``magic`` (a previous output of the same
format), so nothing else is ever replaced.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.core.errors import CompressError


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(magic)) == magic
    except OSError:
        return False


def check_output_file(target: Path, overwrite: bool, *, magic: bytes, kind: str,
                      source: str | os.PathLike[str] | None = None) -> None:
    """Every refusal about the output file, before anything is read or written (bad input: exit 2)."""
    if not os.fspath(target).strip():
        raise CompressError(f"the output path is empty; give the {kind} file to write")
    if target.is_symlink():
        raise CompressError(f"output {target} is a symbolic link; give the path of a new {kind} file")
    if target.is_dir():
        raise CompressError(f"output {target} is a folder; give the path of a {kind} file, e.g. model.gguf")
    if source is not None and Path(source).is_dir():
        folder = Path(source).resolve()
        if folder in target.resolve().parents:
            raise CompressError(f"output {target} is inside the source checkpoint {source}; write it somewhere "
                                "else")
    if not target.exists():
        return
    if not overwrite:
        raise CompressError(f"output {target} exists; pass --overwrite to replace it")
    if not target.is_file() or not _starts_with(target, magic):
        raise CompressError(f"output {target} exists and is not a {kind} file, so --overwrite will not replace "
                            "it; remove it yourself or choose another path")


@contextmanager
def staging_file(target: str | os.PathLike[str], overwrite: bool, *, magic: bytes, kind: str,
                 source: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (not created); on success the file written there replaces
    ``target`` atomically, on any error it is removed."""
    target = Path(target)
    check_output_file(target, overwrite, magic=magic, kind=kind, source=source)
    parent = target.parent
    created = [folder for folder in (parent, *parent.parents) if not folder.exists()]  # innermost first
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CompressError(f"cannot create the output file's folder {parent} ({error.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        _discard(None, created)
        raise CompressError(f"cannot write in the output file's folder {parent} (permission denied)")
    staging = parent / f".{target.name}.tmp-{os.getpid()}"
    staging.unlink(missing_ok=True)  # a leftover of this same pid (never another run's file)
    try:
        yield staging
        if not staging.is_file():
            raise RuntimeError(f"nothing was written to {staging}")
        os.replace(staging, target)
    except OSError as error:
        _discard(staging, created)
        raise CompressError(f"cannot write the output file {target} "
                            f"({error.strerror or type(error).__name__}); nothing was written") from None
    except BaseException:
        _discard(staging, created)
        raise


def _discard(staging: Path | None, created: list[Path]) -> None:
    """Remove the temporary file and the (still empty) folders made for it."""
    if staging is not None:
        staging.unlink(missing_ok=True)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break
