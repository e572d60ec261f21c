"""``--doc-separator`` (calibration and eval text) and ``--eval-seq-len`` set their recipe fields (issue 9)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from compress.cli.common import unescape
from compress.cli.main import app

runner = CliRunner()


def job_args(command: str, model, corpus, out) -> list[str]:
    return [command, str(model), "--dataset", str(corpus), "--num-samples", "4", "--seq-len", "32",
            "--eval-dataset", str(corpus), "--output", str(out), *(["--group-size", "32"] if command == "quantize" else [])]


def test_shell_escapes_are_understood():
    assert unescape(r"\n\n") == "\n\n" and unescape(r"\t|\r") == "\t|\r"
    assert unescape(r"a\\nb") == "a\\nb"  # an escaped backslash stays a backslash
    assert unescape("é\n") == "é\n" and unescape(r"\x") == r"\x" and unescape(None) is None


@pytest.mark.parametrize("command", ["quantize", "prune"])
def test_doc_separator_and_eval_seq_len_set_the_recipe(tiny_llama_dir, corpus_txt, tmp_path, command):
    args = job_args(command, tiny_llama_dir, corpus_txt, tmp_path / "o")
    result = runner.invoke(app, [*args, "--doc-separator", r"\n\n", "--eval-seq-len", "64", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    recipe = json.loads(result.stdout)["recipe"]
    assert recipe["calibration"]["doc_separator"] == "\n\n" and recipe["eval"]["doc_separator"] == "\n\n"
    assert recipe["eval"]["seq_len"] == 64
    plain = runner.invoke(app, [*args, "--dry-run", "--json"])
    recipe = json.loads(plain.stdout)["recipe"]
    assert recipe["calibration"].get("doc_separator") is None and recipe["eval"].get("seq_len") is None


def test_eval_doc_separator(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path), "--doc-separator", r"\n---\n", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["eval"]["doc_separator"] == "\n---\n"
