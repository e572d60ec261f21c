"""Release-grade artifacts: byte-identical reruns (CPU), nothing host- or path-specific hashed, CI gates."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli.main import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("release-in")
    corpus = root / "calib.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(150)))
    return save_tiny("llama", root / "tiny-llama"), corpus


def quantize(model: Path, corpus: Path, out: Path, *extra: str):
    return runner.invoke(app, ["quantize", str(model), "--group-size", "32", "--dataset", str(corpus),
                               "--num-samples", "4", "--seq-len", "32", "--eval-dataset", str(corpus),
                               "--eval-windows", "2", "--device", "cpu", "--output", str(out), "--json", *extra])


def every_file(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_same_recipe_twice_is_byte_identical(inputs, tmp_path, method):
    model, corpus = inputs
    outs = [tmp_path / "first" / "a", tmp_path / "elsewhere" / "deeper" / "b"]  # different paths on purpose
    payloads = []
    for out in outs:
        result = quantize(model, corpus, out, "--method", method, "--asym", "--act-order" if method == "gptq" else
                          "--observer=mse")
        assert result.exit_code == 0, result.output
        payloads.append(json.loads(result.stdout))
    first, second = every_file(outs[0]), every_file(outs[1])
    assert first.keys() == second.keys()
    assert {"model.safetensors", "manifest.json", "README.md", "config.json", "recipe.yaml", "report.json"} <= set(first)
    for name in first:
        assert first[name] == second[name], name
    assert payloads[0]["timings"] != payloads[1]["timings"]  # timings exist, but only on stdout
    for name, data in first.items():  # nothing that differs between machines or output folders is hashed
        text = data.decode("latin-1")
        assert str(outs[0]) not in text and outs[0].name + "/" not in text, name
        assert socket.gethostname() not in text or len(socket.gethostname()) < 4, name
    for name in ("manifest.json", "report.json"):
        assert "timings" not in json.loads(first[name]) and "total_s" not in first[name].decode()


def test_failed_gate_exits_3_saying_by_how_much(inputs, tmp_path):
    model, corpus = inputs
    result = quantize(model, corpus, tmp_path / "gated", "--method", "rtn", "--max-ppl-increase", "0",
                      "--min-compression-ratio", "100")
    assert result.exit_code == 3, result.output
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == 3
    gates = {g["name"]: g for g in payload["gates"]}
    ratio = gates["min_compression_ratio"]
    assert ratio["passed"] is False and ratio["threshold"] == 100 and ratio["value"] < 100
    assert f"by {100 - ratio['value']:.2f}" in ratio["message"] and ratio["message"] in result.stderr
    ppl = gates["max_ppl_increase"]
    if ppl["value"] > 0:
        assert ppl["passed"] is False and "points" in ppl["message"]


def test_sigterm_cleans_up_like_ctrl_c(inputs, tmp_path):
    import os
    import signal
    import subprocess
    import time

    model, corpus = inputs
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli.main", "quantize", str(model), "--group-size", "32",
                             "--dataset", str(corpus), "--num-samples", "64", "--seq-len", "64", "--eval-dataset",
                             str(corpus), "--device", "cpu", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".killed.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".killed*"))


def test_temporary_folders_of_killed_runs_are_removed(inputs, tmp_path):
    model, corpus = inputs
    orphan = tmp_path / ".out.tmp-999999999"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    result = quantize(model, corpus, tmp_path / "out", "--method", "rtn", "--no-eval")
    assert result.exit_code == 0, result.output
    assert not orphan.exists()
