"""``--resume``: an interrupted sweep continues from the last completed block and writes the same bytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.core.errors import CompressError
from compress.pipeline.output_dir import partial_dir
from compress.recipes.schema import Recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _tiny  # noqa: E402

BLOCKS = 4
runner = CliRunner()


@pytest.fixture(scope="module")
def model4(tmp_path_factory) -> Path:
    """A 4-block tiny Llama (the default tiny models have 2 blocks)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("resume") / "llama4"
    config = _tiny.tiny_config("llama")
    config.num_hidden_layers = BLOCKS
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    _tiny.build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume-data") / "calib.txt"
    path.write_text("\n\n".join(f"{_tiny.SENTENCES[i % 10]} {i} {_tiny.SENTENCES[(3 * i) % 10]}" for i in range(120)))
    return path


def recipe_for(model: Path, corpus: Path, method: str, bits: int = 4, stream: bool = True,
               evaluate: bool = True) -> Recipe:
    stage = {"method": method, "sparsity": 0.5} if method == "sparsegpt" else {
        "method": method, "bits": bits, "group_size": 32}
    return Recipe.model_validate({
        "model": str(model), "device": "cpu", "stream": stream,
        "calibration": {"dataset": str(corpus), "num_samples": 4, "seq_len": 32},
        "stages": [stage],
        "eval": {"enabled": evaluate, "dataset": str(corpus), "max_windows": 2, "seq_len": 32},
    })


def interrupt_after(blocks_done: int):
    def progress(label: str, done: int, total: int) -> None:
        if label == "compress blocks" and done == blocks_done:
            raise KeyboardInterrupt

    return progress


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("method", "stream"), [("gptq", True), ("rtn", True), ("gptq", False),
                                                  ("sparsegpt", True)])
def test_interrupted_then_resumed_equals_uninterrupted(model4, corpus, tmp_path, method, stream):
    # eval (twice per run) only where it adds something: the streamed GPTQ case checks eval in the manifest too
    recipe = recipe_for(model4, corpus, method, stream=stream, evaluate=(method, stream) == ("gptq", True))
    compress.run(recipe, tmp_path / "straight")

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        compress.run(recipe, out, resume=True, progress=interrupt_after(2))
    assert not out.exists()
    progress = json.loads((partial_dir(out) / "progress.json").read_text())
    assert progress["completed_blocks"] == 2
    assert (progress["inputs"] is not None) == (method != "rtn")  # hidden states only for calibrated passes

    seen: list[int] = []
    compress.run(recipe, out, resume=True,
                 progress=lambda label, done, total: seen.append(done) if label == "compress blocks" else None)
    assert seen == [3, 4]  # blocks 0 and 1 were not compressed again
    assert not partial_dir(out).exists()
    straight, resumed = files(tmp_path / "straight"), files(out)
    assert straight.keys() == resumed.keys() and "README.md" in straight
    for name in straight:
        assert straight[name] == resumed[name], name


def test_resume_refuses_another_recipe_and_keeps_the_state(model4, corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress.run(recipe_for(model4, corpus, "rtn"), out, resume=True, progress=interrupt_after(1))
    with pytest.raises(CompressError, match="different recipe"):
        compress.run(recipe_for(model4, corpus, "rtn", bits=8), out, resume=True)
    assert (partial_dir(out) / "progress.json").is_file() and not out.exists()


def test_eval_settings_can_change_between_interrupt_and_resume(model4, corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress.run(recipe_for(model4, corpus, "rtn"), out, resume=True, progress=interrupt_after(3))
    changed = recipe_for(model4, corpus, "rtn").model_copy(
        update={"eval": recipe_for(model4, corpus, "rtn").eval.model_copy(update={"max_windows": 1})})
    seen: list[int] = []
    compress.run(changed, out, resume=True,
                 progress=lambda label, done, total: seen.append(done) if label == "compress blocks" else None)
    assert seen == [4] and json.loads((out / "report.json").read_text())["eval"]["windows"] == 1


def test_without_resume_the_partial_run_is_ignored(model4, corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compress.run(recipe_for(model4, corpus, "rtn"), out, resume=True, progress=interrupt_after(1))
    said: list[str] = []
    seen: list[int] = []
    compress.run(recipe_for(model4, corpus, "rtn"), out, log=said.append,
                 progress=lambda label, done, total: seen.append(done) if label == "compress blocks" else None)
    assert seen == [1, 2, 3, 4] and any("pass --resume" in m for m in said)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_failure_before_any_block_leaves_nothing(model4, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CompressError):
        compress.run(recipe_for(model4, tmp_path / "absent.txt", "rtn"), out, resume=True)
    assert not out.exists() and not partial_dir(out).exists()


def test_cli_ctrl_c_with_resume_then_resume(model4, corpus, tmp_path, monkeypatch):
    from compress.passes.quantize import gptq

    args = ["quantize", str(model4), "--group-size", "32", "--dataset", str(corpus), "--num-samples", "4",
            "--seq-len", "32", "--no-eval", "--device", "cpu"]
    assert runner.invoke(app, [*args, "--output", str(tmp_path / "straight")]).exit_code == 0
    real, calls = gptq.gptq_quantize, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == len(gptq.AUTO_CANDIDATES) * (7 * 2 + 1) + 1:  # inside block 2 (7 layers, 3 solves each)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gptq, "gptq_quantize", flaky)
    out = tmp_path / "cli"
    result = runner.invoke(app, [*args, "--output", str(out), "--resume"])
    assert result.exit_code == 130 and "--resume to continue" in result.stderr
    assert not out.exists()
    monkeypatch.setattr(gptq, "gptq_quantize", real)
    result = runner.invoke(app, [*args, "--output", str(out), "--resume", "--json"])
    assert result.exit_code == 0, result.output
    assert "resuming after block 2" in result.stderr
    assert files(out) == files(tmp_path / "straight")


CHANNELS = {"method": "structured", "target": "channels", "ratio": 0.25}
HEADS = {"method": "structured", "target": "heads", "ratio": 0.25}
DROP = {"method": "structured", "target": "blocks", "num_blocks": 1}
GPTQ = {"method": "gptq", "bits": 4, "group_size": 32}
SWEEPS = ("prune channels", "prune heads", "score blocks", "compress blocks")


@pytest.mark.parametrize(("stages", "label", "after", "resumed"), [
    ([CHANNELS], "prune channels", 2, [("prune channels", 3), ("prune channels", 4)]),
    ([HEADS], "prune heads", 1, [("prune heads", 2), ("prune heads", 3), ("prune heads", 4)]),
    ([DROP], "score blocks", 3, [("score blocks", 4)]),  # the scores of blocks 0-2 come from the checkpoint
    ([CHANNELS, GPTQ], "prune channels", 2, [("prune channels", 3), ("prune channels", 4)] + [
        ("compress blocks", i) for i in range(1, 5)]),
    ([CHANNELS, GPTQ], "compress blocks", 2, [("compress blocks", 3), ("compress blocks", 4)]),
    ([DROP, GPTQ], "compress blocks", 1, [("compress blocks", 2), ("compress blocks", 3)]),  # 3 blocks left
], ids=["channels", "heads", "blocks", "channels+gptq@prune", "channels+gptq@quantize", "blocks+gptq@quantize"])
def test_structured_runs_resume_to_the_same_bytes(model4, corpus, tmp_path, stages, label, after, resumed):
    """Every kind of step resumes per block: sliced blocks and what each kept, block scores, and a later
    sweep on the smaller model; a finished sweep is restored whole (its progress is not shown again)."""
    recipe = Recipe.model_validate({
        "model": str(model4), "device": "cpu", "calibration": {"dataset": str(corpus), "num_samples": 4, "seq_len": 32},
        "stages": stages, "eval": {"enabled": False}})
    compress.run(recipe, tmp_path / "straight")

    def interrupt(seen_label: str, done: int, total: int) -> None:
        if seen_label == label and done == after:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        compress.run(recipe, out, resume=True, progress=interrupt)
    assert not out.exists() and (partial_dir(out) / "progress.json").is_file()
    seen: list[tuple[str, int]] = []
    said: list[str] = []
    compress.run(recipe, out, resume=True, log=said.append,
                 progress=lambda name, done, total: seen.append((name, done)) if name in SWEEPS else None)
    assert seen == resumed and any(line.startswith("resuming after block") for line in said)
    straight, again = files(tmp_path / "straight"), files(out)
    assert straight.keys() == again.keys()
    for name in straight:
        assert straight[name] == again[name], name
