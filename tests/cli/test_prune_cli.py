"""`compress prune` on a tiny model: the happy path, JSON, and every bad input it must refuse (exit 2,
one sentence, no output directory)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli.main import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(120)))
    return path


def prune_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--dataset", str(corpus), "--num-samples", "4", "--seq-len", "32",
            "--output", str(out), "--eval-dataset", str(corpus), "--eval-windows", "2", *extra]


def test_prune_json_reports_sparse_export(llama_dir, corpus, tmp_path) -> None:
    out = tmp_path / "wanda"
    result = runner.invoke(app, prune_args(llama_dir, corpus, out, "--method", "wanda", "--json"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["output"] == str(out) and payload["layers"] == 14
    assert payload["metrics"]["kl"] >= 0
    # the default export is a plain dense checkpoint (zeros stored): as large as the source, readable anywhere
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").is_file()


def test_prune_sparse_format_bitmask_shrinks_the_checkpoint(llama_dir, corpus, tmp_path) -> None:
    out = tmp_path / "wanda-bitmask"
    result = runner.invoke(app, prune_args(llama_dir, corpus, out, "--method", "wanda", "--sparse-format", "bitmask",
                                           "--json"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["size_after_bytes"] < payload["size_before_bytes"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert not (out / "model.safetensors").exists() and (out / "sparse-bitmask.safetensors").is_file()
    bad = runner.invoke(app, prune_args(llama_dir, corpus, tmp_path / "x", "--sparse-format", "csr"))
    assert bad.exit_code == 2 and "--sparse-format" in bad.output


def test_dry_run_lists_layers_without_weights(llama_dir, corpus, tmp_path) -> None:
    result = runner.invoke(app, prune_args(llama_dir, corpus, tmp_path / "dry", "--pattern", "2:4", "--dry-run",
                                           "--json"))
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["recipe"]["stages"][0]["pattern"] == "2:4" and len(plan["stages"][0]["layers"]) == 14
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "1.0"], "--sparsity"),
        (["--sparsity", "-0.1"], "--sparsity"),
        (["--pattern", "2:3"], "runs of 3"),
        (["--pattern", "two"], "N:M"),
        (["--pattern", "4:4"], "between 1 and M-1"),
        (["--method", "wanda", "--bits", "4"], "--bits does not apply"),
        (["--method", "pruneit"], "pruneit"),
        (["--structured", "channels"], "--ratio"),
        (["--ratio", "0.2"], "--structured"),
        (["--structured", "heads", "--ratio", "0.5", "--pattern", "2:4"], "does not combine"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(llama_dir, corpus, tmp_path, extra, message) -> None:
    out = tmp_path / "bad"
    result = runner.invoke(app, prune_args(llama_dir, corpus, out, *extra))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_per_layer_sparsity_file(llama_dir, corpus, tmp_path) -> None:
    spec = tmp_path / "sparsity.yaml"
    spec.write_text("mlp.down_proj: 0.75\n're:.*self_attn\\..*': 0.25\n")
    out = tmp_path / "per-layer"
    result = runner.invoke(app, prune_args(llama_dir, corpus, out, "--method", "magnitude", "--per-layer-sparsity",
                                           str(spec), "--no-eval", "--json"))
    assert result.exit_code == 0, result.output
    recipe = (out / "recipe.yaml").read_text()
    assert "mlp.down_proj: 0.75" in recipe
    bad = tmp_path / "bad.yaml"
    bad.write_text("mlp: lots\n")
    result = runner.invoke(app, prune_args(llama_dir, corpus, tmp_path / "x", "--per-layer-sparsity", str(bad)))
    assert result.exit_code == 2 and "must map a pattern to a number" in result.output
    bad.write_text("mlp: 1.5\n")
    result = runner.invoke(app, prune_args(llama_dir, corpus, tmp_path / "x", "--per-layer-sparsity", str(bad)))
    assert result.exit_code == 2 and "sparsity must be in [0, 1)" in result.output
