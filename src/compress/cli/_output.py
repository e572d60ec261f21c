"""Everything the terminal sees: progress and logs on stderr, results on stdout (rich tables or one JSON).

Library code never prints; it calls the ``progress(label, done, total)`` and ``log(message)`` callbacks
made here.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False)


def quiet_libraries() -> None:
    """Our progress bars replace the libraries' own (tqdm on stderr, 'Generating train split', ...)."""
    import os
    import sys

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # datasets costs ~2 s to import and a data-free job (RTN, magnitude, --no-eval) never needs it: it reads
    # these when (if) it is imported; its parse errors reach us as CompressError, so its own log stays quiet
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    route_library_logs()
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if "datasets" in sys.modules:  # imported already (a test, a notebook): the variables came too late
            datasets = sys.modules["datasets"]
            datasets.disable_progress_bars()
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


class _WarningHandler(logging.Handler):
    """Library warnings (logger "compress") shown like our own, one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        log(record.getMessage())


def route_library_logs() -> None:
    logger = logging.getLogger("compress")
    if not any(isinstance(h, _WarningHandler) for h in logger.handlers):
        logger.addHandler(_WarningHandler(level=logging.WARNING))


def log(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}")


def info(message: str) -> None:
    err.print(message)


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal that can redraw bars (not a pipe, a file or a CI log)."""
    isatty = getattr(err.file, "isatty", None)
    try:
        tty = bool(isatty and isatty())
    except ValueError:  # a closed stream
        tty = False
    return tty and err.is_terminal and not err.is_dumb_terminal


class PlainProgress:
    """Progress as plain lines for a stderr that is not a terminal (``> log 2>&1``, CI): no ANSI, one line
    each, flushed, e.g. ``[compress] block 3/12 (gptq) 25.1 s`` (time since the command started).

    Per-block steps get a line each; other counters (tokenization, captured inputs, eval windows) a line when
    they finish and at most one per ``interval`` seconds while they run, so a log is not flooded.
    """

    STEPS = ("compress blocks", "score blocks")

    def __init__(self, stream: Any, *, what: str | None = None, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.what, self.interval, self.clock = stream, what, interval, clock
        self.start = clock()
        self._last: dict[str, float] = {}
        self._shown: dict[str, tuple[int, int]] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        now = self.clock()
        shown = self._shown.get(label)
        if shown is not None and done < shown[0]:  # the counter starts again (a second eval pass)
            del self._shown[label]
            self._last[label] = now
            shown = None
        self._last.setdefault(label, now)
        if shown == (done, total) or done <= 0:
            return
        finished = total > 0 and done >= total
        step = label in self.STEPS or label.startswith("prune ")
        if not (finished or step or now - self._last[label] >= self.interval):
            return
        self._last[label], self._shown[label] = now, (done, total)
        self.stream.write(f"[compress] {self._describe(label, done, total)} {now - self.start:.1f} s\n")
        self.stream.flush()

    def _describe(self, label: str, done: int, total: int) -> str:
        if label == "load model":
            return "model loaded"
        if label == "compress blocks":
            return f"block {done}/{total}" + (f" ({self.what})" if self.what else "")
        if label in self.STEPS or label.startswith("prune "):
            return f"{label}: block {done}/{total}"
        return f"{label} {done}/{total}"


@contextmanager
def progress_bars(enabled: bool = True, what: str | None = None) -> Iterator[Any]:
    """Yield a ``progress(label, done, total)`` callback for stderr: one bar per label on a terminal, plain
    lines otherwise (``PlainProgress``). ``what`` names the block sweep's methods in those lines."""
    if not enabled:
        yield lambda label, done, total: None
        return
    if not stderr_is_terminal():
        yield PlainProgress(err.file, what=what)
        return
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)
    tasks: dict[str, int] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bars.add_task(label, total=total)
        bars.update(tasks[label], completed=done, total=total)

    with bars:
        yield update


def print_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def print_yaml(payload: dict[str, Any]) -> None:
    """``payload`` as YAML on stdout, written raw (no rich wrapping or markup: the output must parse)."""
    import yaml

    write_raw(yaml.safe_dump(payload, sort_keys=False, allow_unicode=True))


def write_raw(text: str) -> None:
    """``text`` on stdout exactly as given: for output users redirect into files (YAML, recipes)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def human_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} TB"


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def metrics_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if "baseline_ppl" in metrics:
        rows.append(("perplexity before", fmt(metrics["baseline_ppl"])))
    if "ppl" in metrics:
        rows.append(("perplexity after" if "baseline_ppl" in metrics else "perplexity", fmt(metrics["ppl"])))
    if "ppl_increase" in metrics:
        rows.append(("perplexity increase", f"{metrics['ppl_increase'] * 100:+.2f}%"))
    if "kl" in metrics:
        rows.append(("KL to baseline (nats/token)", fmt(metrics["kl"])))
    if "top1" in metrics:
        rows.append(("top-1 agreement", f"{metrics['top1'] * 100:.2f}%"))
    if "cosine" in metrics:
        rows.append(("embedding cosine (mean / min)", f"{metrics['cosine']:.5f} / {metrics['cosine_min']:.5f}"))
        rows.append(("similarity rank correlation", f"{metrics['spearman']:.5f}"))
    if "tokens" in metrics and "windows" in metrics:
        rows.append(("eval text", f"{metrics['dataset']}: {metrics['windows']} windows x {metrics['seq_len']} "
                     f"({metrics['tokens']:,} predicted tokens)"))
    return rows
