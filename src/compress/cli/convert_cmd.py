"""``compress convert``: the same quantized weights, re-arranged as compressed-tensors or the GPTQ layout."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli._output import key_value_table, out, print_json
from compress.cli.errors import handle_errors
from compress.core.errors import CompressError


@handle_errors
def convert(
    path: str = typer.Argument(..., help="A quantized checkpoint folder (compressed-tensors or GPTQ layout)."),
    to: str = typer.Option(..., "--to", help="Target layout: compressed-tensors or gptq."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (written whole or not at all)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Convert PATH losslessly to another checkpoint layout (same codes, scales, zero points, g_idx)."""
    import time

    from compress.export.convert import FORMATS, convert_checkpoint
    from compress.pipeline.output_dir import staging_dir

    if to not in FORMATS:
        raise CompressError(f"--to {to!r} is not a layout we write; use {' or '.join(FORMATS)}")
    source = Path(path)
    if source.resolve() == output.resolve():
        raise CompressError("--output must be a different folder than the checkpoint being converted")
    start = time.perf_counter()
    with staging_dir(output, overwrite) as staging:
        summary = convert_checkpoint(source, staging, to)
    summary.update({"output": str(output), "timings": {"total_s": time.perf_counter() - start}})
    if as_json:
        print_json(summary)
        return
    rows = [("source", f"{summary['source']} ({summary['from']})"), ("output", f"{summary['output']} ({to})"),
            ("layers", f"{summary['layers']} ({summary['scheme']})"), ("copied", ", ".join(summary["copied"]) or "-"),
            ("wall time", f"{summary['timings']['total_s']:.1f} s")]
    out.print(key_value_table("compress convert: done", rows))
