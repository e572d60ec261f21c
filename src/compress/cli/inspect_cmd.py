"""``compress inspect``: what a checkpoint holds, read from headers only (no tensor data loaded)."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli._output import human_bytes, out, print_json
from compress.cli._params import flag
from compress.cli.errors import handle_errors


@handle_errors
def inspect(
    path: str = typer.Argument(..., help="A checkpoint folder."),
    as_json: bool = flag("--json", "Print one JSON object."),
    dry_run: bool = flag("--dry-run", "Accepted for symmetry; inspect never loads weights."),
) -> None:
    """Layers, schemes, bits per weight and size by component of a checkpoint."""
    from compress.evaluate.inspect import inspect_checkpoint

    report = inspect_checkpoint(Path(path))
    if as_json:
        print_json(report)
        return
    from rich.table import Table

    out.print(f"[bold]{path}[/bold]: {report['architecture']}  ({report['format']})")
    sizes = Table(title="size by component", title_justify="left")
    sizes.add_column("component")
    sizes.add_column("bytes", justify="right")
    for component, count in report["bytes_by_component"].items():
        sizes.add_row(component, human_bytes(count))
    sizes.add_row("[bold]total[/bold]", human_bytes(report["total_bytes"]))
    out.print(sizes)
    layers = Table(title=f"{len(report['layers'])} quantized layers", title_justify="left")
    for column in ("layer", "shape", "scheme", "bits/weight"):
        layers.add_column(column)
    for layer in report["layers"]:
        layers.add_row(layer["name"], f"{layer['out_features']}x{layer['in_features']}", layer["scheme"],
                       f"{layer['bits_per_weight']:.3f}")
    out.print(layers)
    if report["dense"]:
        out.print(f"dense tensors: {len(report['dense'])} ({human_bytes(report['bytes_by_component'].get('dense', 0))})")
    kv = report.get("kv_cache")
    if kv:
        per = "one scale per layer" if kv["strategy"] == "tensor" else "one scale per KV head"
        out.print(f"KV cache: FP8 e4m3 static, {per} for keys and values, in {kv['layers']} attention modules")
