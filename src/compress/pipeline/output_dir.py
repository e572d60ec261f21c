"""Output folders that appear whole or not at all, and never at the cost of someone else's files.

Work happens in a hidden temporary sibling; only a finished artifact is moved into place, so a failure,
a bad input found late, or Ctrl-C never leaves a half-written output directory behind.

A resumable run (``--resume``) stages instead in ``.<name>.partial/artifact`` beside the output: a stable
name, so the next run can find the block checkpoints kept next to it (``compress.pipeline.resume``). On a
failure only the half-written artifact is removed; the checkpoints stay when at least one block was saved.

Before any work (``check_output``): the output must not be the current folder or one above it, the home
folder, or overlap the source model; ``--overwrite`` replaces only a previous output of this toolkit
(recognised by the content of its manifest, with no file the manifest does not list); and the parent must
take a new folder (the staging folder is created first, so a read-only parent is found at once).

Replacing a previous output (``_move_into_place``): the old folder is renamed aside, the new one renamed in,
then the old one deleted; if the second rename fails the old folder is renamed back, so a failed replace
never loses the previous output. A run killed between the two renames leaves ``.<name>.old-<pid>``: the next
run for the same output renames it back before anything else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.core.errors import CompressError

PROGRESS_NAME = "progress.json"


class CheckpointedInterrupt(KeyboardInterrupt):
    """Ctrl-C in a ``--resume`` run after at least one block was saved: how much is kept, and where."""

    def __init__(self, saved_blocks: int, folder: Path) -> None:
        super().__init__(f"{saved_blocks} blocks are saved in {folder}")
        self.saved_blocks = saved_blocks
        self.folder = folder


def partial_dir(out_dir: Path) -> Path:
    """Where a resumable run for ``out_dir`` keeps its checkpoints and its staged artifact."""
    return out_dir.parent / f".{out_dir.name}.partial"


def output_path(value: str | os.PathLike[str]) -> Path:
    """``value`` as an output folder; an empty path is refused (``Path("")`` would mean the current folder)."""
    if not os.fspath(value).strip():
        raise CompressError("the output path is empty; give the folder to write, e.g. --output compressed/model")
    return Path(value)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError, OSError):  # no HOME and no password entry
        return None


def _unlisted_files(folder: Path, listed: dict) -> list[str]:
    """Files in ``folder`` that its manifest does not list (the manifest itself aside)."""
    extra = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel != "manifest.json" and rel not in listed and (path.is_symlink() or not path.is_dir()):
            extra.append(rel)
    return extra


def _read_only(folder: Path) -> Path | None:
    """The first folder of the tree ``folder`` whose entries we may not delete, if any."""
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink())]:
        if not os.access(path, os.W_OK | os.X_OK):
            return path
    return None


def check_output(out_dir: Path, overwrite: bool, *, source: str | os.PathLike[str] | None = None) -> None:
    """Every refusal about the output folder, before anything is read or written (bad input: exit 2)."""
    from compress.export.manifest import our_manifest

    target = out_dir.resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, target):
        where = "the current folder" if target == cwd else "a folder that contains the current folder"
        raise CompressError(f"output {out_dir} is {where}; give a new folder for the output, e.g. "
                            f"--output compressed/model")
    if source is not None and Path(source).is_dir():
        model = Path(source).resolve()
        if _inside(target, model) or _inside(model, target):
            relation = ("the source model folder" if target == model else
                        "inside the source model folder" if _inside(target, model) else
                        "a folder that contains the source model")
            raise CompressError(f"output {out_dir} is {relation} {source}; write the output somewhere else")
    if out_dir.is_symlink() and not out_dir.exists():
        raise CompressError(f"output {out_dir} is a broken symbolic link; remove it or choose another folder")
    if out_dir.is_symlink() and overwrite:
        raise CompressError(f"output {out_dir} is a symbolic link; --overwrite replaces only a real folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise CompressError(f"output {out_dir} exists and is a file")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise CompressError(f"output {out_dir} exists and is not empty; pass --overwrite to replace it")
    if target == _home():
        raise CompressError(f"output {out_dir} is the home folder; --overwrite will not replace it")
    manifest = our_manifest(out_dir)
    if manifest is None:
        raise CompressError(f"output {out_dir} is not empty and is not a previous output of compress (it has no "
                            f"manifest.json written by compress), so --overwrite will not delete it; remove it "
                            f"yourself or choose another folder")
    extra = _unlisted_files(out_dir, manifest["files"])
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise CompressError(f"output {out_dir} holds files that are not part of the previous output ({shown}), "
                            f"so --overwrite will not delete it; move them out or choose another folder")
    locked = _read_only(out_dir)
    if locked is not None:
        raise CompressError(f"output {out_dir} cannot be replaced: {locked} is read-only")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def _dead_pid(folder: Path) -> bool:
    pid = folder.name.rpartition("-")[2]
    return pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))


def _restore_interrupted_replace(out_dir: Path) -> None:
    """A run killed between renaming the previous output aside and the new one in: put the previous back."""
    for aside in sorted(out_dir.parent.glob(f".{out_dir.name}.old-*")):
        if _dead_pid(aside) and not out_dir.exists() and not out_dir.is_symlink():
            try:
                os.rename(aside, out_dir)
            except OSError:
                continue


def _remove_orphans(out_dir: Path) -> None:
    """Temporary folders of earlier runs for this output that were killed (SIGKILL runs no cleanup), and
    previous outputs that a killed run had already replaced (``.old-<pid>`` once the new output is in place)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        if _dead_pid(stale):
            shutil.rmtree(stale, ignore_errors=True)
    if out_dir.exists():
        for stale in out_dir.parent.glob(f".{out_dir.name}.old-*"):
            if _dead_pid(stale):
                shutil.rmtree(stale, ignore_errors=True)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; a folder already there is renamed aside first and deleted only once
    the new one is in place (renamed back if that fails)."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    aside = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    os.rename(out_dir, aside)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(aside, out_dir)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if aside.exists():
        logging.getLogger("compress").warning("the previous output, moved to %s, could not be removed", aside)


def _saved_blocks(partial: Path) -> int:
    try:
        state = json.loads((partial / PROGRESS_NAME).read_text(encoding="utf-8"))
        return int(state.get("completed_blocks", 0)) if isinstance(state, dict) else 0
    except (OSError, ValueError, TypeError):
        return 0


@contextmanager
def staging_dir(out_dir: str | os.PathLike[str], overwrite: bool, *, resumable: bool = False,
                source: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir``, on any error it is removed
    (for a resumable run: all but the saved checkpoints). ``source``: the model folder being read, which the
    output may not overlap."""
    out_dir = output_path(out_dir)
    _restore_interrupted_replace(out_dir)
    check_output(out_dir, overwrite, source=source)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CompressError(f"cannot create the output folder's parent {parent} ({error.strerror})") from None
    _remove_orphans(out_dir)
    partial = partial_dir(out_dir)
    staging = partial / "artifact" if resumable else parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        if staging.exists():  # a resumed run redoes the export from the restored blocks
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    except OSError as error:
        raise CompressError(f"cannot write in the output folder's parent {parent} "
                            f"({error.strerror or type(error).__name__})") from None
    try:
        yield staging
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        saved = _saved_blocks(partial) if resumable else 0
        if resumable and not saved:
            shutil.rmtree(partial, ignore_errors=True)
        if saved and isinstance(error, KeyboardInterrupt) and not isinstance(error, CheckpointedInterrupt):
            raise CheckpointedInterrupt(saved, partial) from error
        raise
    existed = out_dir.exists()
    try:
        _move_into_place(staging, out_dir)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        kept = "the previous output is unchanged" if existed else "nothing was written"
        raise CompressError(f"cannot move the finished output into {out_dir} "
                            f"({error.strerror or type(error).__name__}); {kept}") from None
    if resumable:
        shutil.rmtree(partial, ignore_errors=True)
