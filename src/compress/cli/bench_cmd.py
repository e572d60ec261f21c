"""``compress bench``: prefill and decode tokens/s, peak memory and load time, side by side with a baseline."""

from __future__ import annotations

from typing import Any

import typer

from compress.cli._output import human_bytes, info, out, print_json
from compress.cli._params import flag
from compress.cli.errors import handle_errors


@handle_errors
def bench(
    path: str = typer.Argument(..., help="A compressed checkpoint or any HF model folder / hub id."),
    baseline: str | None = typer.Option(None, help="The model to compare against (e.g. the original)."),
    prompt_len: int = typer.Option(128, help="Prompt tokens per sequence (prefill)."),
    new_tokens: int = typer.Option(64, help="Greedy tokens generated with the KV cache (decode)."),
    batch: int = typer.Option(1, help="Sequences per batch."),
    kernel: str = typer.Option("auto", help="Forward path of quantized layers: auto (never slower than dense), reference, dense, cpu or triton."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    repeats: int = typer.Option(3, help="Timed prefill runs after a warm-up (the median is reported)."),
    as_json: bool = flag("--json", "Print one JSON object on stdout."),
) -> None:
    """Measure PATH's speed and memory (random prompts), optionally against --baseline."""
    from compress.evaluate.speed import compare, measure

    settings = {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch, "kernel": kernel,
                "device": device, "repeats": repeats}
    model = measure(path, **settings)
    base = measure(baseline, **{**settings, "kernel": "auto"}) if baseline is not None else None
    payload = {**compare(model, base), "settings": settings}
    if as_json:
        print_json(payload)
        return
    _print_table(payload)


def _print_table(payload: dict[str, Any]) -> None:
    from rich.table import Table

    model, base, ratio = payload["model"], payload.get("baseline"), payload.get("ratio") or {}
    s = payload["settings"]
    table = Table(title=f"compress bench: batch {s['batch']}, prompt {s['prompt_len']}, {s['new_tokens']} new "
                        f"tokens, {model['device']}", title_justify="left")
    table.add_column("")
    table.add_column("model", justify="right")
    if base is not None:
        table.add_column("baseline", justify="right")
        table.add_column("ratio", justify="right")

    def num(value: float | None, unit: str = "") -> str:
        return "-" if value is None else f"{value:,.1f}{unit}"

    rows = [("prefill tokens/s", "prefill_tokens_per_s", num), ("decode tokens/s", "decode_tokens_per_s", num),
            ("peak memory", "peak_memory_bytes", human_bytes), ("weights in memory", "model_bytes", human_bytes),
            ("load time", "load_s", lambda v: num(v, " s"))]
    for label, key, show in rows:
        cells = [label, show(model[key])]
        if base is not None:
            r = ratio.get(key)
            cells += [show(base[key]), "-" if r is None else f"{r:.2f}x"]
        table.add_row(*cells)
    out.print(table)
    info(f"peak memory: {model['memory_kind']}")
    if model["kernels"]:
        info("kernels: " + ", ".join(f"{k} x{v}" for k, v in sorted(model["kernels"].items())))
        if model["kernels"].get("dense"):
            info(f"{model['kernels']['dense']} layers run dense: a packed kernel was slower than a dense matmul on "
                 "them (or none serves their scheme), so kernel=auto dequantized their weights once at load; "
                 "they take dense memory")
