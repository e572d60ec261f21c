"""Bad input through the real CLI (issue 9): exit 2, one line on stderr naming the problem, nothing written,
and refused before any weights are read — by ``--dry-run`` too, which never reads weights."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli.main import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import SENTENCES, save_tiny  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny("bert", tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("\n\n".join(SENTENCES * 20) + "\n")
    return path


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES * 4))
    return path


@pytest.fixture
def no_weights(monkeypatch):
    """A run that reaches the weights fails the test (exit 1 instead of 2): the refusal must come first."""
    import compress.pipeline.run as run_module

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was refused")

    monkeypatch.setattr(run_module, "_load", refuse)


def quantize(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), "--method", "rtn", "--group-size", "32", "--dataset", str(data),
            "--num-samples", "2", "--seq-len", "16", "--output", str(out), *extra]


def refused(args: list[str], out: Path, *words: str) -> str:
    """Exit 2, exactly one stderr line holding ``words``, no traceback, no output or temporary folder."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return lines[0]


DRY = [pytest.param(["--dry-run"], id="dry-run"), pytest.param([], id="run")]


# 1. an ignore regex that does not compile ------------------------------------------------------------------


@pytest.mark.parametrize("dry", DRY)
def test_ignore_regex_that_does_not_compile(llama_dir, corpus, tmp_path, no_weights, dry):
    out = tmp_path / "out"
    refused(quantize(llama_dir, corpus, out, "--ignore", "re:((", *dry), out,
            "--ignore", "'re:(('", "not a valid regular expression")


# 2. gates that cannot be checked ---------------------------------------------------------------------------


@pytest.mark.parametrize("dry", DRY)
def test_gate_with_eval_disabled(llama_dir, corpus, tmp_path, no_weights, dry):
    out = tmp_path / "out"
    line = refused(quantize(llama_dir, corpus, out, "--no-eval", "--max-ppl-increase", "0.05", *dry), out,
                   "--max-ppl-increase", "eval is disabled")
    assert "encoder" not in line


def _recipe(tmp_path: Path, model: Path, data: Path, eval_: dict) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": str(model), "calibration": {"dataset": str(data), "num_samples": 2,
                                                                        "seq_len": 16},
                                  "eval": eval_, "stages": [{"method": "rtn", "group_size": 32}]}))
    return recipe


@pytest.mark.parametrize("dry", DRY)
def test_cosine_gate_on_a_causal_lm(llama_dir, corpus, tmp_path, no_weights, dry):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, llama_dir, corpus, {"dataset": str(corpus), "min_cosine": 0.9})
    refused(["run", str(recipe), "--output", str(out), *dry], out, "--min-cosine", "only to encoder models")


@pytest.mark.parametrize("dry", DRY)
def test_perplexity_gate_on_an_encoder(bert_dir, rows, tmp_path, no_weights, dry):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, bert_dir, rows, {"dataset": str(rows), "max_ppl_increase": 0.05})
    refused(["run", str(recipe), "--output", str(out), *dry], out, "--max-ppl-increase",
            "does not apply to encoder models")


def test_encoder_eval_on_one_text_file_needs_a_separator(bert_dir, rows, corpus, tmp_path, no_weights):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, bert_dir, rows, {"dataset": str(corpus)})
    refused(["run", str(recipe), "--output", str(out)], out, "single document", "doc_separator")


# 3. pruning options that cannot all take effect ------------------------------------------------------------


@pytest.mark.parametrize("dry", DRY)
@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--pattern", "2:4", "--sparsity", "0.7"], ["--sparsity", "--pattern", "0.7", "2:4"]),
        (["--group-size", "64"], ["--group-size", "--bits"]),
        (["--asym"], ["--sym/--asym", "--bits"]),
    ],
)
def test_conflicting_prune_flags(llama_dir, corpus, tmp_path, no_weights, dry, extra, words):
    out = tmp_path / "out"
    args = ["prune", str(llama_dir), "--dataset", str(corpus), "--num-samples", "2", "--seq-len", "16",
            "--output", str(out), *extra, *dry]
    refused(args, out, *words)


def test_a_pattern_alone_records_its_sparsity(llama_dir, corpus, tmp_path):
    result = runner.invoke(app, ["prune", str(llama_dir), "--pattern", "1:4", "--dataset", str(corpus),
                                 "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    stage = json.loads(result.stdout)["recipe"]["stages"][0]
    assert (stage["pattern"], stage["sparsity"]) == ("1:4", 0.75)


# 4. a model folder without a tokenizer ---------------------------------------------------------------------


def test_model_folder_without_tokenizer(llama_dir, corpus, tmp_path):
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(llama_dir / name, model / name)
    out = tmp_path / "out"
    line = refused(quantize(model, corpus, out, "--no-eval"), out, "has no usable tokenizer", "tokenizer.json",
                   "copy the tokenizer files")
    assert not line.rstrip().endswith(":") and "from one of" not in line


# 5. a calibration or eval file without text ----------------------------------------------------------------


@pytest.mark.parametrize("dry", DRY)
@pytest.mark.parametrize(("name", "content"), [("empty.txt", ""), ("blank.txt", "\n\n  \n\n"),
                                               ("empty.jsonl", ""), ("empty.csv", "")])
def test_calibration_file_without_text(llama_dir, tmp_path, no_weights, dry, name, content):
    data = tmp_path / name
    data.write_text(content)
    out = tmp_path / "out"
    line = refused(quantize(llama_dir, data, out, "--no-eval", *dry), out, name, "has no text")
    for internals in ("features", "StopIteration", "columns to parse"):
        assert internals not in line


def test_eval_file_without_text(llama_dir, corpus, tmp_path, no_weights):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    out = tmp_path / "out"
    refused(quantize(llama_dir, corpus, out, "--eval-dataset", str(data)), out, "empty.jsonl", "has no text")


# 6. a recipe with a typo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dry", DRY)
def test_recipe_typo_names_the_key(tmp_path, no_weights, dry):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("stges:\n  - method: rtn\n")
    out = tmp_path / "out"
    line = refused(["run", str(recipe), "--output", str(out), *dry], out,
                   "unknown key 'stges' at the top level", "did you mean 'stages'?")
    assert "more problem" not in line


# 8. a dataset that is not there, checked before the model loads --------------------------------------------


@pytest.mark.parametrize("dry", DRY)
@pytest.mark.parametrize("which", ["--dataset", "--eval-dataset"])
def test_missing_dataset_file(llama_dir, corpus, tmp_path, no_weights, dry, which):
    out = tmp_path / "out"
    args = quantize(llama_dir, corpus, out, *dry)
    args += [which, str(tmp_path / "absent.jsonl")]  # the last --dataset given wins
    refused(args, out, "absent.jsonl", "does not exist")


@pytest.mark.parametrize("dry", DRY)
def test_dataset_with_an_unsupported_suffix(llama_dir, tmp_path, no_weights, dry):
    data = tmp_path / "data.xml"
    data.write_text("<doc>text</doc>")
    out = tmp_path / "out"
    refused(quantize(llama_dir, data, out, "--no-eval", *dry), out, "unsupported extension '.xml'")
