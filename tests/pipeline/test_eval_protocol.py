"""The text protocol reaches the pipeline: eval.seq_len and the doc separators are honoured by a real run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import compress
from compress.calibrate.data import calibration_samples, load_texts, tokenize_stream
from compress.models.load import load_tokenizer
from compress.pipeline.evaluation import evaluate
from compress.recipes.schema import EvalConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import SENTENCES, save_tiny  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "heldout.txt"
    path.write_text("\n\n".join(SENTENCES * 6) + "\n")
    return path


def test_eval_scores_the_text_file_as_one_stream_in_windows_of_eval_seq_len(llama_dir, text_file):
    tok = load_tokenizer(str(llama_dir))
    whole = tokenize_stream(tok, load_texts(str(text_file)))
    split = tokenize_stream(tok, load_texts(str(text_file), "\n\n"))
    assert whole.numel() != split.numel()
    metrics = evaluate(str(llama_dir), baseline=None, config=EvalConfig(dataset=str(text_file), seq_len=16))
    assert (metrics["seq_len"], metrics["windows"]) == (16, whole.numel() // 16)
    assert "doc_separator" not in metrics
    per_doc = evaluate(str(llama_dir), baseline=None,
                       config=EvalConfig(dataset=str(text_file), seq_len=24, doc_separator="\n\n"))
    assert (per_doc["seq_len"], per_doc["windows"], per_doc["doc_separator"]) == (24, split.numel() // 24, "\n\n")


def test_calibration_uses_the_recipe_separator(llama_dir, text_file, tmp_path):
    def run(separator: str | None, out: str) -> dict:
        recipe = compress.Recipe(
            model=str(llama_dir), stages=[{"method": "gptq", "group_size": 32}], eval={"enabled": False},
            calibration={"dataset": str(text_file), "num_samples": 2, "seq_len": 16, "doc_separator": separator})
        return compress.run(recipe, tmp_path / out).calibration

    tok = load_tokenizer(str(llama_dir))
    whole, split = run(None, "whole"), run("\n\n", "split")
    assert whole["fingerprint"] == calibration_samples(tok, str(text_file), 2, 16).fingerprint
    assert split["fingerprint"] == calibration_samples(tok, str(text_file), 2, 16, doc_separator="\n\n").fingerprint
    assert whole["fingerprint"] != split["fingerprint"]
