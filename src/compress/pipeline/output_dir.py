"""Output folders that appear whole or not at all.

Work happens in a hidden temporary sibling; only a finished artifact is renamed into place, so a failure,
a bad input found late, or Ctrl-C never leaves a half-written output directory behind.

A resumable run (``--resume``) stages instead in ``.<name>.partial/artifact`` beside the output: a stable
name, so the next run can find the block checkpoints kept next to it (``compress.pipeline.resume``). On a
failure only the half-written artifact is removed; the checkpoints stay when at least one block was saved.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.core.errors import CompressError

PROGRESS_NAME = "progress.json"


def partial_dir(out_dir: Path) -> Path:
    """Where a resumable run for ``out_dir`` keeps its checkpoints and its staged artifact."""
    return out_dir.parent / f".{out_dir.name}.partial"


def check_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CompressError(f"output {out_dir} exists and is a file")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CompressError(f"output {out_dir} exists and is not empty; pass --overwrite to replace it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def _remove_orphans(out_dir: Path) -> None:
    """Temporary folders of earlier runs for this output that were killed (SIGKILL runs no cleanup)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def staging_dir(out_dir: Path, overwrite: bool, *, resumable: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir``, on any error it is removed
    (for a resumable run: all but the saved checkpoints)."""
    check_output(out_dir, overwrite)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CompressError(f"cannot create the output folder's parent {parent} ({error.strerror})") from None
    _remove_orphans(out_dir)
    partial = partial_dir(out_dir)
    staging = partial / "artifact" if resumable else parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if staging.exists():  # a resumed run redoes the export from the restored blocks
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if resumable and not (partial / PROGRESS_NAME).is_file():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    if resumable:
        shutil.rmtree(partial, ignore_errors=True)
