"""Output folders that appear whole or not at all.

Work happens in a hidden temporary sibling; only a finished artifact is renamed into place, so a failure,
a bad input found late, or Ctrl-C never leaves a half-written output directory behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.core.errors import CompressError


def check_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CompressError(f"output {out_dir} exists and is a file")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CompressError(f"output {out_dir} exists and is not empty; pass --overwrite to replace it")


@contextmanager
def staging_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir``, on any error it is removed."""
    check_output(out_dir, overwrite)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CompressError(f"cannot create the output folder's parent {parent} ({error.strerror})") from None
    staging = parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
