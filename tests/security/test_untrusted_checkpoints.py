"""Untrusted checkpoints: validated before they are read, refused in one sentence, never executed."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.core.errors import CompressError
from compress.models.load import load_model
from compress.models.safety import check_safetensors_header

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny, write_pickle_only  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("sec") / "llama")


@pytest.fixture(scope="module")
def packed(tiny, tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("sec-data") / "c.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(80)))
    out = tmp_path_factory.mktemp("sec-out") / "w4"
    result = runner.invoke(app, ["quantize", str(tiny), "--method", "rtn", "--group-size", "32", "--no-eval",
                                 "--dataset", str(corpus), "--num-samples", "2", "--seq-len", "16", "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _sharded(src: Path, dst: Path, shard_name: str) -> Path:
    """``src`` with an index whose entry for one tensor is ``shard_name``."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").rename(dst / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(dst / "model-00001-of-00001.safetensors"), "pt") as handle:
        weight_map = {k: "model-00001-of-00001.safetensors" for k in handle.keys()}  # noqa: SIM118
    weight_map[next(iter(weight_map))] = shard_name
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors", ".."])
def test_index_escaping_the_folder_is_refused_by_both_loaders(tiny, packed, tmp_path, name):
    for src, load in ((tiny, lambda f: load_model(str(f))), (packed, lambda f: compress.load(f, device="cpu"))):
        folder = _sharded(src, tmp_path / f"m-{src.name}", name)
        with pytest.raises(CompressError, match="not a file inside the checkpoint") as caught:
            load(folder)
        assert "\n" not in str(caught.value)
        shutil.rmtree(folder)


def test_quantize_refuses_an_escaping_index_with_exit_2(tiny, tmp_path):
    folder = _sharded(tiny, tmp_path / "m", "../../etc/passwd")
    result = runner.invoke(app, ["quantize", str(folder), "--method", "rtn", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a file inside the checkpoint" in result.stderr
    assert not (tmp_path / "o").exists()


def _header_file(path: Path, header: dict, data: bytes = b"\0" * 16, claimed: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data)
    return path


@pytest.mark.parametrize(("header", "claimed", "needle"), [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 10**12, "header claims"),
    ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, None, "outside the file"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, None, "needs 8"),
    ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, None, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, None, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, None, "overlap"),
    ({"__metadata__": {"format": 1}}, None, "metadata"),
])
def test_safetensors_header_lies_are_named(tmp_path, header, claimed, needle):
    path = _header_file(tmp_path / "w.safetensors", header, claimed=claimed)
    with pytest.raises(CompressError, match=needle):
        check_safetensors_header(path)


def test_a_consistent_header_passes(tmp_path):
    path = _header_file(tmp_path / "w.safetensors", {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})
    assert check_safetensors_header(path) == {"a": ("F32", [2, 2])}


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("num_bits", 0, "bit width"), ("num_bits", 16, "bit width"), ("num_bits", "4", "bit width"),
    ("num_bits", True, "bit width"), ("group_size", 0, "group size"), ("group_size", -4, "group size"),
    ("group_size", 1.5, "group size"), ("group_size", 2**40, "weight_scale"),
])
def test_quantization_config_out_of_range(packed, tmp_path, field, value, needle):
    folder = tmp_path / "ckpt"
    shutil.copytree(packed, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match=needle):
        compress.load(folder, device="cpu")


class _Payload:
    """A pickle that would create a marker file when unpickled by an unrestricted loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_is_refused_and_never_executed(tmp_path):
    folder = write_pickle_only("llama", tmp_path / "legacy")
    marker = tmp_path / "pwned"
    with (folder / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Payload(marker)}, handle)
    result = runner.invoke(app, ["quantize", str(folder), "--method", "rtn", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--allow-pickle" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(CompressError):  # allowed, but loaded with weights_only=True: the payload is rejected
        load_model(str(folder), allow_pickle=True)
    assert not marker.exists()


def test_remote_code_is_off_unless_asked(tiny, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    loaded = load_model(str(folder))  # the auto_map is ignored: the built-in Llama class is used
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


def test_corrupt_source_weights_are_named_not_taken_for_a_compressed_checkpoint(tiny, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, ["quantize", str(folder), "--method", "rtn", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "truncated or corrupt" in result.stderr and "already a compressed" not in result.stderr
