"""Checkpoints that disagree with themselves: ``compress.load`` raises CompressError naming the tensor or file,
and ``compress eval`` / ``compress inspect`` exit 2 with one sentence and no traceback."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.core.errors import CompressError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402

runner = CliRunner()
LAYER = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-ckpt")
    model = save_tiny("llama", root / "llama")
    corpus = root / "calib.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(80)))
    folders = {}
    for fmt in ("compressed-tensors", "gptq"):
        out = root / fmt
        result = runner.invoke(app, ["quantize", str(model), "--method", "rtn", "--group-size", "32", "--asym",
                                     "--dataset", str(corpus), "--num-samples", "2", "--seq-len", "16", "--no-eval",
                                     "--format", fmt, "--output", str(out)])
        assert result.exit_code == 0, result.output
        folders[fmt] = out
    folders["corpus"] = corpus
    return folders


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _shard(folder: Path, name: str) -> None:
    """Split into a sharded layout whose index names ``name`` for one tensor."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    weight_map = {k: "model-00001-of-00001.safetensors" for k in tensors}
    weight_map["lm_head.weight"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


CASES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "packed width truncated": ("compressed-tensors", lambda f: _edit_tensors(
        f, lambda t: t.__setitem__(f"{LAYER}.weight_packed", t[f"{LAYER}.weight_packed"][:, :-1].contiguous())),
        f"{LAYER}.weight_packed"),
    "bits 5": ("compressed-tensors", lambda f: _edit_config(
        f, lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].__setitem__("num_bits", 5)),
        "bit width 5"),
    "truncated shard": ("compressed-tensors", _truncate, "model.safetensors"),
    "index escapes": ("compressed-tensors", lambda f: _shard(f, "../x.safetensors"), "../x.safetensors"),
    "index absolute": ("compressed-tensors", lambda f: _shard(f, "/etc/x.safetensors"), "/etc/x.safetensors"),
    "config not json": ("compressed-tensors", lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
    "no quantization_config": ("compressed-tensors", lambda f: _edit_config(
        f, lambda d: d.pop("quantization_config")), "no quantization_config"),
    "missing tensor": ("compressed-tensors", lambda f: _edit_tensors(
        f, lambda t: t.pop("model.norm.weight")), "model.norm.weight"),
    "missing scale": ("compressed-tensors", lambda f: _edit_tensors(
        f, lambda t: t.pop(f"{LAYER}.weight_scale")), f"{LAYER}.weight_scale"),
    "gptq bits 5": ("gptq", lambda f: _edit_config(
        f, lambda d: d["quantization_config"].__setitem__("bits", 5)), "bits 5"),
    "gptq qweight truncated": ("gptq", lambda f: _edit_tensors(
        f, lambda t: t.__setitem__(f"{LAYER}.qweight", t[f"{LAYER}.qweight"][:-1].contiguous())),
        f"{LAYER}.qweight"),
    "gptq qzeros missing": ("gptq", lambda f: _edit_tensors(
        f, lambda t: t.pop(f"{LAYER}.qzeros")), f"{LAYER}.qzeros"),
    "gptq without quantization_config": ("gptq", lambda f: _edit_config(
        f, lambda d: d.pop("quantization_config")), "no quantization_config"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_one_sentence(good, tmp_path, case):
    fmt, corrupt, needle = CASES[case]
    folder = tmp_path / "ckpt"
    shutil.copytree(good[fmt], folder)
    corrupt(folder)
    with pytest.raises(CompressError) as caught:
        compress.load(folder, device="cpu")
    assert needle in str(caught.value)
    for args in (["inspect", str(folder)], ["eval", str(folder), "--dataset", str(good["corpus"]),
                                            "--seq-len", "16", "--max-windows", "1"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args[0], result.output)
        assert "Traceback" not in result.output and "internal error" not in result.output
        message = result.stderr.strip().splitlines()
        assert len(message) == 1 and message[0].startswith("error: "), (args[0], result.stderr)
