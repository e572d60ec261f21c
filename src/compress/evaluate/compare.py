"""Several compress outputs side by side: what each cost (bytes) and what it lost (KL, ppl, top-1, cosine).

Why from ``report.json`` and not by re-evaluating: every output of ``compress quantize``, ``prune`` and ``run``
already holds its evaluation against the uncompressed model, so a comparison is instant and repeatable in CI.
What makes two reports comparable is said, not assumed: outputs evaluated on different text (dataset, window
length, window count) or made from different source models are flagged in ``notes``, because a KL measured
on other windows, or against another baseline, is not the same quantity.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compress.core.errors import CompressError

METRICS = ("ppl", "baseline_ppl", "ppl_increase", "kl", "top1", "cosine", "spearman")
"""The eval keys carried over from each report (the ``--json`` names of ``compress eval``)."""


@dataclass(frozen=True)
class OutputSummary:
    """One output folder as the comparison shows it."""

    label: str
    path: str
    source_model: str | None
    methods: tuple[str, ...]
    schemes: tuple[str, ...]
    layers: int
    size_bytes: int | None
    baseline_size_bytes: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    eval_text: str | None = None
    """``dataset, windows x seq_len`` of its evaluation (None: written with ``--no-eval``)."""

    @property
    def compression_ratio(self) -> float | None:
        if not self.size_bytes or not self.baseline_size_bytes:
            return None
        return self.baseline_size_bytes / self.size_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(methods=list(self.methods), schemes=list(self.schemes), compression_ratio=self.compression_ratio)
        return data


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_output(path: str | Path, label: str | None = None) -> OutputSummary:
    """The summary of one output folder from its ``report.json``; one-sentence CompressError otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        raise CompressError(f"{folder} is not a folder; compare takes output folders written by compress "
                            "quantize, prune or run")
    report_file = folder / "report.json"
    if not report_file.is_file():
        raise CompressError(f"{folder} has no report.json, so it is not an output of compress quantize, prune or "
                            "run; evaluate other checkpoints with compress eval PATH --baseline BASE")
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CompressError(f"{report_file} cannot be read as JSON ({type(error).__name__})") from None
    if not isinstance(report, dict):
        raise CompressError(f"{report_file} does not hold a report object")
    layers = [layer for layer in report.get("layers") or [] if isinstance(layer, dict)]
    evaluation = report.get("eval") if isinstance(report.get("eval"), dict) else {}
    metrics = {key: value for key in METRICS if (value := _number(evaluation.get(key))) is not None}
    eval_text = None
    if evaluation.get("dataset") is not None:
        eval_text = f"{evaluation['dataset']}, {evaluation.get('windows', '?')} x {evaluation.get('seq_len', '?')}"
    size = _number(report.get("size_after_bytes"))
    base = _number(report.get("size_before_bytes"))
    return OutputSummary(
        label=label or folder.name, path=str(folder),
        source_model=report.get("source_model") if isinstance(report.get("source_model"), str) else None,
        methods=tuple(sorted({str(layer["method"]) for layer in layers if layer.get("method")})),
        schemes=tuple(sorted({str(layer["scheme"]) for layer in layers if layer.get("scheme")})),
        layers=len(layers), size_bytes=None if size is None else int(size),
        baseline_size_bytes=None if base is None else int(base), metrics=metrics, eval_text=eval_text)


def _labels(paths: list[Path]) -> list[str]:
    """Folder names, or the paths themselves where two outputs share a folder name."""
    names = [path.name or str(path) for path in paths]
    return [str(path) if names.count(name) > 1 else name for path, name in zip(paths, names, strict=True)]


def compare_outputs(paths: list[str | Path]) -> tuple[list[OutputSummary], list[str]]:
    """Every output's summary, in the order given, and the notes on what makes them less comparable."""
    if not paths:
        raise CompressError("compare needs at least one output folder")
    folders = [Path(p) for p in paths]
    resolved = [folder.resolve() for folder in folders]
    if len(set(resolved)) != len(resolved):
        raise CompressError("the same output folder is given twice; list each output once")
    rows = [read_output(folder, label) for folder, label in zip(folders, _labels(folders), strict=True)]
    notes = []
    texts = {row.eval_text for row in rows if row.eval_text is not None}
    if len(texts) > 1:
        notes.append("evaluated on different text (" + "; ".join(sorted(texts)) + "): their metrics are not the "
                     "same quantity; re-run compress eval on one --dataset to compare them")
    sources = {row.source_model for row in rows if row.source_model is not None}
    if len(sources) > 1:
        notes.append("made from different source models (" + ", ".join(sorted(sources)) + "): each is measured "
                     "against its own baseline")
    missing = [row.label for row in rows if not row.metrics]
    if missing:
        notes.append(f"no evaluation in {', '.join(missing)} (written with --no-eval): sizes only")
    return rows, notes


def quality_axis(rows: list[OutputSummary]) -> tuple[str, str]:
    """The metric a size-vs-quality view plots: ``kl`` for causal LMs, ``1 - cosine`` for encoders, as (key,
    axis label); refused when the outputs mix the two or none has either."""
    kinds = {("kl" if "kl" in row.metrics else "cosine") for row in rows if {"kl", "cosine"} & row.metrics.keys()}
    if not kinds:
        raise CompressError("none of these outputs holds an evaluation (KL or cosine) to plot; write them without "
                            "--no-eval or compare evaluated outputs")
    if len(kinds) > 1:
        raise CompressError("these outputs mix causal LMs (KL) and encoders (cosine), which share no quality axis; "
                            "compare each kind on its own")
    return ("kl", "KL to the uncompressed model (nats/token)") if kinds == {"kl"} \
        else ("cosine", "1 - cosine to the uncompressed model")


def markdown_table(rows: list[OutputSummary], notes: list[str]) -> str:
    """A GitHub-flavoured table (CI step summaries), the notes under it."""

    def cell(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
        return "-" if value is None else f"{value * scale:{spec}}{suffix}"

    lines = ["| output | method | scheme | size MB | ratio | ppl (base) | ppl +% | KL | top-1 | cosine |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m = row.metrics
        ppl = "-" if "ppl" not in m else f"{m['ppl']:.3f}" + (f" ({m['baseline_ppl']:.3f})" if "baseline_ppl" in m
                                                              else "")
        lines.append(" | ".join([
            f"| {row.label}", ", ".join(row.methods) or "-", ", ".join(row.schemes) or "-",
            cell(None if row.size_bytes is None else row.size_bytes / 1e6, ".2f"),
            cell(row.compression_ratio, ".2f", suffix="x"), ppl, cell(m.get("ppl_increase"), "+.2f", 100, "%"),
            cell(m.get("kl"), ".5f"), cell(m.get("top1"), ".1f", 100, "%"), cell(m.get("cosine"), ".4f")]) + " |")
    lines += [f"\n> {note}" for note in notes]
    return "\n".join(lines)
