"""``compress compare``: outputs side by side from their report.json, Markdown / JSON / PNG, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli.main import app
from compress.core.errors import CompressError
from compress.evaluate.compare import compare_outputs, quality_axis, read_output

runner = CliRunner()


def _output(folder: Path, *, kl: float | None, size: int, scheme: str = "w4g128", dataset: str = "demo-heldout",
            source: str = "demo (embedded)", cosine: float | None = None) -> Path:
    folder.mkdir(parents=True)
    evaluation = {} if kl is None and cosine is None else {
        "dataset": dataset, "windows": 8, "seq_len": 256, "baseline_ppl": 40.0, "ppl": 40.0 * (1 + (kl or 0)),
        "ppl_increase": kl or 0.0}
    if kl is not None:
        evaluation.update(kl=kl, top1=1 - kl)
    if cosine is not None:
        evaluation.update(cosine=cosine)
    report = {"eval": evaluation, "gates": [], "parameters": 10, "size_after_bytes": size,
              "size_before_bytes": 4_000_000, "source_model": source,
              "layers": [{"name": "l0", "method": "gptq", "scheme": scheme}, {"name": "l1", "method": "gptq",
                                                                               "scheme": scheme}]}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


@pytest.fixture
def outputs(tmp_path) -> list[Path]:
    return [_output(tmp_path / "w4", kl=0.02, size=1_000_000), _output(tmp_path / "w3", kl=0.1, size=800_000,
                                                                       scheme="w3g128")]


def test_summaries_carry_sizes_metrics_and_schemes(outputs):
    rows, notes = compare_outputs(outputs)
    assert [r.label for r in rows] == ["w4", "w3"] and notes == []
    assert rows[0].compression_ratio == pytest.approx(4.0) and rows[1].schemes == ("w3g128",)
    assert rows[1].metrics["kl"] == 0.1 and rows[0].methods == ("gptq",) and rows[0].layers == 2


def test_incomparable_outputs_are_flagged(tmp_path, outputs):
    other = _output(tmp_path / "other", kl=0.01, size=900_000, dataset="wikitext", source="gpt2")
    bare = _output(tmp_path / "bare", kl=None, size=900_000)
    _, notes = compare_outputs([*outputs, other, bare])
    assert any("different text" in n for n in notes) and any("different source models" in n for n in notes)
    assert any("bare" in n and "--no-eval" in n for n in notes)


def test_same_folder_names_get_their_paths(tmp_path):
    a = _output(tmp_path / "a" / "out", kl=0.1, size=1)
    b = _output(tmp_path / "b" / "out", kl=0.2, size=1)
    rows, _ = compare_outputs([a, b])
    assert [r.label for r in rows] == [str(a), str(b)]


def test_quality_axis_refuses_mixed_and_missing(tmp_path):
    causal = read_output(_output(tmp_path / "c", kl=0.1, size=1))
    encoder = read_output(_output(tmp_path / "e", kl=None, cosine=0.99, size=1))
    bare = read_output(_output(tmp_path / "b", kl=None, size=1))
    assert quality_axis([causal])[0] == "kl" and quality_axis([encoder])[0] == "cosine"
    with pytest.raises(CompressError, match="mix causal LMs"):
        quality_axis([causal, encoder])
    with pytest.raises(CompressError, match="none of these outputs"):
        quality_axis([bare])


def test_cli_markdown_and_json(outputs):
    result = runner.invoke(app, ["compare", *map(str, outputs), "--markdown"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| output |") and lines[2].startswith("| w4 | gptq | w4g128 | 1.00 | 4.00x")
    assert "0.10000" in lines[3]
    result = runner.invoke(app, ["compare", *map(str, outputs), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [o["label"] for o in data["outputs"]] == ["w4", "w3"] and data["plot"] is None


def test_cli_plot_writes_a_png_and_keeps_other_files(outputs, tmp_path):
    png = tmp_path / "plots" / "size_kl.png"
    result = runner.invoke(app, ["compare", *map(str, outputs), "--plot", str(png), "--json"])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:4] == b"\x89PNG" and json.loads(result.stdout)["plot"]["points"] == 2
    again = runner.invoke(app, ["compare", *map(str, outputs), "--plot", str(png)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, ["compare", *map(str, outputs), "--plot", str(png), "--overwrite"]).exit_code == 0
    precious = tmp_path / "notes.png"
    precious.write_text("not a png")
    result = runner.invoke(app, ["compare", *map(str, outputs), "--plot", str(precious), "--overwrite"])
    assert result.exit_code == 2 and precious.read_text() == "not a png"


@pytest.mark.parametrize(("make", "needle"), [
    (lambda t: [t / "missing"], "is not a folder"),
    (lambda t: [t], "has no report.json"),
    (lambda t: [_output(t / "x", kl=0.1, size=1)] * 2, "given twice"),
])
def test_cli_refusals(tmp_path, make, needle):
    result = runner.invoke(app, ["compare", *map(str, make(tmp_path))])
    assert result.exit_code == 2 and needle in result.output


def test_cli_refuses_a_plot_inside_an_output_and_bad_names(outputs, tmp_path):
    inside = outputs[0] / "plot.png"
    result = runner.invoke(app, ["compare", *map(str, outputs), "--plot", str(inside)])
    assert result.exit_code == 2 and "inside the source checkpoint" in result.output and not inside.exists()
    result = runner.invoke(app, ["compare", *map(str, outputs), "--plot", str(tmp_path / "plot.txt")])
    assert result.exit_code == 2 and ".png" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "report.json").write_text("{not json")
    result = runner.invoke(app, ["compare", str(broken)])
    assert result.exit_code == 2 and "cannot be read as JSON" in result.output


def test_a_real_output_reads(tmp_path, tiny_llama_dir, corpus_txt):
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(tiny_llama_dir), "--method", "rtn", "--group-size", "32", "--dataset", str(corpus_txt),
                                 "--eval-windows", "2", "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = compare_outputs([out])[0]
    assert row.metrics["kl"] >= 0 and row.size_bytes and row.schemes == ("w4g32",) and row.methods == ("rtn",)
