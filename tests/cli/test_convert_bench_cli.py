"""`compress convert` and `compress bench` through the CLI: outputs, JSON, exit codes on bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli.main import app
from compress.export.manifest import sha256_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("convert-bench")
    model = save_tiny("llama", root / "llama")
    corpus = root / "calib.txt"
    corpus.write_text("\n\n".join(f"a small model {i} learns to predict the next word" for i in range(80)))
    out = root / "w4"
    result = runner.invoke(app, ["quantize", str(model), "--method", "rtn", "--group-size", "32", "--dataset",
                                 str(corpus), "--num-samples", "2", "--seq-len", "16", "--no-eval", "--output",
                                 str(out)])
    assert result.exit_code == 0, result.output
    return {"model": model, "w4": out, "root": root}


def test_convert_json_and_artifact(folders):
    out = folders["root"] / "w4-gptq"
    result = runner.invoke(app, ["convert", str(folders["w4"]), "--to", "gptq", "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert (payload["from"], payload["to"], payload["layers"], payload["scheme"]) == (
        "compressed-tensors", "gptq", 14, "w4g32")
    assert payload["output"] == str(out) and "total_s" in payload["timings"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    manifest = json.loads((out / "manifest.json").read_text())
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    assert all(manifest["files"][f]["sha256"] == sha256_file(out / f) for f in files)
    assert {"quantize_config.json", "tokenizer.json", "generation_config.json", "recipe.yaml"} <= files
    inspected = runner.invoke(app, ["inspect", str(out), "--json"])
    assert inspected.exit_code == 0, inspected.output
    report = json.loads(inspected.stdout)
    assert report["format"] == "gptq" and len(report["layers"]) == 14

    again = runner.invoke(app, ["convert", str(folders["w4"]), "--to", "gptq", "--output", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (["--to", "awq"], "not a layout we write"),
    (["--to", "compressed-tensors"], "already in the compressed-tensors layout"),
])
def test_convert_bad_input_exits_2(folders, tmp_path, args, needle):
    result = runner.invoke(app, ["convert", str(folders["w4"]), *args, "--output", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_convert_refuses_dense_model_and_same_folder(folders, tmp_path):
    dense = runner.invoke(app, ["convert", str(folders["model"]), "--to", "gptq", "--output", str(tmp_path / "d")])
    assert dense.exit_code == 2 and "not a quantized checkpoint" in dense.stderr
    same = runner.invoke(app, ["convert", str(folders["w4"]), "--to", "gptq", "--output", str(folders["w4"])])
    assert same.exit_code == 2 and "different folder" in same.stderr


def test_bench_side_by_side_json(folders):
    # the reference path keeps only the packed codes (auto may hold dense copies where packed kernels lose)
    result = runner.invoke(app, ["bench", str(folders["w4"]), "--baseline", str(folders["model"]), "--prompt-len",
                                 "16", "--new-tokens", "4", "--repeats", "1", "--kernel", "reference", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    for side in ("model", "baseline"):
        figures = payload[side]
        assert figures["prefill_tokens_per_s"] > 0 and figures["decode_tokens_per_s"] > 0
        assert figures["peak_memory_bytes"] > 0 and figures["load_s"] > 0
    assert payload["model"]["kernels"] and not payload["baseline"]["kernels"]
    assert payload["ratio"]["model_bytes"] < 1
    assert payload["settings"]["prompt_len"] == 16


def test_bench_table_and_bad_input(folders):
    table = runner.invoke(app, ["bench", str(folders["w4"]), "--prompt-len", "8", "--new-tokens", "2",
                                "--repeats", "1"])
    assert table.exit_code == 0, table.output
    assert "decode tokens/s" in table.stdout
    too_long = runner.invoke(app, ["bench", str(folders["w4"]), "--prompt-len", "400", "--new-tokens", "2"])
    assert too_long.exit_code == 2 and "context" in too_long.stderr
    missing = runner.invoke(app, ["bench", str(folders["root"] / "nope")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
