"""What a run tells the user (issue 9): progress lines in a log, the table of a failed gate, what structured
pruning and the per-channel fallback really did, inspect on GPTQ folders and what convert changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli.main import app

runner = CliRunner()


def quantize_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), "--method", "rtn", "--group-size", "32", "--dataset", str(corpus),
            "--num-samples", "4", "--seq-len", "32", "--eval-dataset", str(corpus), "--eval-windows", "2",
            "--output", str(out), *extra]


def prune_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--dataset", str(corpus), "--num-samples", "4", "--seq-len", "32",
            "--eval-dataset", str(corpus), "--eval-windows", "2", "--output", str(out), *extra]


# ---- progress when stderr is not a terminal ----------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_progress_lines_reach_a_piped_stderr(tiny_llama_dir, corpus_txt, tmp_path, as_json):
    out = tmp_path / "out"
    args = quantize_args(tiny_llama_dir, corpus_txt, out, *(["--json"] if as_json else []))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("FORCE_COLOR", None)
    # stderr is a pipe, as in a CI log
    done = subprocess.run([sys.executable, "-m", "compress.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    progress = [line for line in lines if line.startswith("[compress] ")]
    assert "\x1b" not in done.stderr and "\r" not in done.stderr
    assert any(line.startswith("[compress] model loaded ") for line in progress), lines
    blocks = [line for line in progress if line.startswith("[compress] block ")]
    assert [line.split(" s")[0].rsplit(" ", 1)[0] for line in blocks] == [
        "[compress] block 1/2 (rtn)", "[compress] block 2/2 (rtn)"]
    assert all(line.endswith(" s") for line in progress)
    assert len(progress) <= 12  # milestones and one line per block, not a flood
    if as_json:
        assert json.loads(done.stdout)["output"] == str(out)  # stdout still holds exactly one object


def test_plain_progress_throttles_fast_counters_but_not_blocks():
    from compress.cli._output import PlainProgress

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    class Stream:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def write(self, text: str) -> None:
            self.lines += text.splitlines()

        def flush(self) -> None:
            pass

    clock, stream = Clock(), Stream()
    progress = PlainProgress(stream, what="gptq", interval=10.0, clock=clock)
    progress("load model", 0, 1)
    assert stream.lines == []  # nothing done yet: no line
    clock.now = 2.0
    progress("load model", 1, 1)
    for done in range(1, 5001):  # a fast counter: 5000 updates within 30 s
        clock.now = 2.0 + done * 30 / 5000
        progress("tokenize", done, 5000)
    for block in range(1, 4):
        clock.now += 0.5
        progress("compress blocks", block, 3)
    progress("compress blocks", 3, 3)  # a repeat prints nothing
    assert stream.lines[0] == "[compress] model loaded 2.0 s"
    tokenize = [line for line in stream.lines if "tokenize" in line]
    assert 2 <= len(tokenize) <= 4 and tokenize[-1] == "[compress] tokenize 5000/5000 32.0 s"
    assert [line for line in stream.lines if "block" in line] == [
        "[compress] block 1/3 (gptq) 32.5 s", "[compress] block 2/3 (gptq) 33.0 s", "[compress] block 3/3 (gptq) 33.5 s"]


# ---- a failed gate still shows the metrics ----------------------------------------------------------------


def test_failed_gate_prints_the_table_then_the_verdict(tiny_llama_dir, corpus_txt, tmp_path):
    result = runner.invoke(app, quantize_args(tiny_llama_dir, corpus_txt, tmp_path / "gated",
                                              "--min-compression-ratio", "1000"))
    assert result.exit_code == 3, result.output
    assert "perplexity after" in result.stdout and "compression ratio" in result.stdout
    assert "gate failed:" in result.stderr and "min_compression_ratio" not in result.stdout
    assert result.output.index("perplexity after") < result.output.index("gate failed:")


def test_failed_eval_gate_prints_the_table_then_the_verdict(tiny_llama_dir, corpus_txt, tmp_path):
    out = tmp_path / "w4"
    assert runner.invoke(app, quantize_args(tiny_llama_dir, corpus_txt, out, "--no-eval")).exit_code == 0
    result = runner.invoke(app, ["eval", str(out), "--baseline", str(tiny_llama_dir), "--dataset", str(corpus_txt),
                                 "--seq-len", "32", "--max-windows", "2", "--min-compression-ratio", "1000"])
    assert result.exit_code == 3, result.output
    assert "perplexity after" in result.stdout and "top-1 agreement" in result.stdout
    assert "gate failed:" in result.stderr


# ---- structured pruning says what it removed ---------------------------------------------------------------


def test_structured_heads_report_what_was_removed(tiny_llama_dir, corpus_txt, tmp_path):
    """4 heads in 2 KV groups: 25% asked becomes one query head per group, i.e. 50%; the run says so."""
    out = tmp_path / "heads"
    result = runner.invoke(app, prune_args(tiny_llama_dir, corpus_txt, out, "--structured", "heads", "--ratio",
                                           "0.25", "--json"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["parameters_after"] < payload["parameters"]
    [stage] = payload["structured"]
    assert (stage["target"], stage["asked"]) == ("heads", 0.25)
    assert stage["num_attention_heads"] == [4, 2]
    summary = stage["summary"]
    assert summary.startswith("heads: 25% asked, 2 of 4 query heads per block removed (50%")
    assert "nearest cut the config accepts" in summary and "1 of 2 from each of the 2 KV groups" in summary
    report = json.loads((out / "report.json").read_text())
    assert report["structured"][0]["summary"] == summary
    assert (report["parameters"], report["parameters_after"]) == (payload["parameters"], payload["parameters_after"])

    table = runner.invoke(app, prune_args(tiny_llama_dir, corpus_txt, tmp_path / "heads-table", "--structured",
                                          "heads", "--ratio", "0.25", "--no-eval"))
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert f"{payload['parameters']:,} → {payload['parameters_after']:,}" in text
    assert "2 of 4 query heads per block removed" in text.replace("│ │", "")
    assert "layers compressed" not in text


@pytest.mark.parametrize(("target", "needle"), [
    ("heads", "2 of 4 query heads per block removed (50%, the nearest cut the config accepts"),
    ("channels", "channels: 25% asked, 32 of 128 MLP channels per block removed (25%)"),
    ("blocks", "blocks: 25% asked, 1 of 2 blocks dropped (50%)"),
])
def test_structured_dry_run_says_the_same_from_the_config(tiny_llama_dir, corpus_txt, tmp_path, target, needle):
    args = prune_args(tiny_llama_dir, corpus_txt, tmp_path / "dry", "--structured", target, "--ratio", "0.25",
                      "--dry-run")
    plan = runner.invoke(app, [*args, "--json"])
    assert plan.exit_code == 0, plan.output
    [entry] = json.loads(plan.stdout)["structured"]
    assert needle in entry["summary"]
    shown = runner.invoke(app, args, terminal_width=300)
    assert shown.exit_code == 0, shown.output
    assert needle in shown.stdout
    assert not (tmp_path / "dry").exists()


# ---- per-channel fallback is said, and counted -------------------------------------------------------------


def test_per_channel_fallback_is_reported(tiny_llama_dir, corpus_txt, tmp_path):
    """Group 128 fits only down_proj (128 inputs); the 12 other block linears (64 inputs) fall back."""
    extra = ("--group-size", "128", "--indivisible", "per-channel", "--no-eval")
    args = quantize_args(tiny_llama_dir, corpus_txt, tmp_path / "mixed", *extra)
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["per_channel_fallback"] == 12
    assert payload["notes"] == ["12 of 14 layers quantized per channel instead of in groups of 128: their input "
                                "width (64) is not a multiple of 128 (indivisible: per-channel)"]
    shown = runner.invoke(app, quantize_args(tiny_llama_dir, corpus_txt, tmp_path / "mixed-table", *extra))
    assert shown.exit_code == 0, shown.output
    fallback = [line for line in shown.stderr.splitlines() if "quantized per channel" in line]
    assert len(fallback) == 1 and "12 of 14 layers" in fallback[0]
    dry = runner.invoke(app, [*args, "--dry-run"], terminal_width=300)
    assert dry.exit_code == 0 and "12 of 14 layers would be quantized per channel" in dry.stderr


def test_no_fallback_is_zero(tiny_llama_dir, corpus_txt, tmp_path):
    result = runner.invoke(app, quantize_args(tiny_llama_dir, corpus_txt, tmp_path / "w4", "--no-eval", "--json"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["per_channel_fallback"] == 0 and payload["notes"] == []
    assert payload["parameters_after"] is None and payload["structured"] == []


# ---- inspect on a GPTQ-layout folder ------------------------------------------------------------------------


def test_inspect_counts_gptq_tensors_as_quantized(tiny_llama_dir, corpus_txt, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "gptq"
    result = runner.invoke(app, quantize_args(tiny_llama_dir, corpus_txt, out, "--format", "gptq", "--asym",
                                              "--no-eval"))
    assert result.exit_code == 0, result.output
    report = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
    sizes: dict[str, int] = {}
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118
            tensor = handle.get_tensor(name)
            leaf = name.rsplit(".", 1)[-1]
            sizes[leaf] = sizes.get(leaf, 0) + tensor.numel() * tensor.element_size()
    by = report["bytes_by_component"]
    assert by["quantized weights"] == sizes["qweight"] > 0
    assert by["scales/zeros"] == sizes["qzeros"] + sizes["scales"] + sizes.get("g_idx", 0) > 0
    assert sum(by.values()) == report["total_bytes"] == sum(sizes.values())
    shown = runner.invoke(app, ["inspect", str(out)], terminal_width=200)
    assert shown.exit_code == 0 and "0 B" not in shown.stdout.split("scales/zeros")[0]


# ---- convert says what changes -------------------------------------------------------------------------------


def test_convert_says_scales_become_fp16(tiny_llama_dir, corpus_txt, tmp_path):
    """An fp32 model has fp32 scales; the GPTQ layout stores fp16: codes and zeros are copied, scales rounded."""
    src, gptq, back = tmp_path / "ct", tmp_path / "gptq", tmp_path / "back"
    assert runner.invoke(app, quantize_args(tiny_llama_dir, corpus_txt, src, "--asym", "--no-eval")).exit_code == 0
    result = runner.invoke(app, ["convert", str(src), "--to", "gptq", "--output", str(gptq), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["unchanged"] == ["codes", "zero points"]
    assert (payload["scales"]["from"], payload["scales"]["to"]) == ("float32", "float16")
    assert 0 < payload["scales"]["max_relative_change"] < 2**-10  # fp16 rounding: at most half an ulp (2^-11)
    shown = runner.invoke(app, ["convert", str(gptq), "--to", "compressed-tensors", "--output", str(back)],
                          terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "codes, zero points and group order (g_idx) copied unchanged" in shown.stdout  # GPTQ always has g_idx
    assert "float16, unchanged" in shown.stdout  # fp16 → fp16 is bit-exact
    help_text = runner.invoke(app, ["convert", "--help"], terminal_width=200).stdout
    assert "losslessly" not in help_text and "float16" in help_text
