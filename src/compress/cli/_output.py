"""Everything the terminal sees: progress and logs on stderr, results on stdout (rich tables or one JSON).

Library code never prints; it calls the ``progress(label, done, total)`` and ``log(message)`` callbacks
made here.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
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

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    route_library_logs()
    try:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors reach us as CompressError
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


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Any]:
    """Yield a ``progress(label, done, total)`` callback drawing one bar per label on stderr."""
    if not enabled or not err.is_terminal:
        yield lambda label, done, total: None
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
