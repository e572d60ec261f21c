"""``compress convert``: the same quantized weights, re-arranged as compressed-tensors or the GPTQ layout."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli._output import key_value_table, out, print_json
from compress.cli._params import flag
from compress.cli.errors import handle_errors
from compress.core.errors import CompressError


@handle_errors
def convert(
    path: str = typer.Argument(..., help="A quantized checkpoint folder (compressed-tensors or GPTQ layout)."),
    to: str = typer.Option(..., "--to", help="Target layout: compressed-tensors or gptq."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (written whole or not at all)."),
    overwrite: bool = flag("--overwrite", "Replace a non-empty output folder."),
    as_json: bool = flag("--json", "Print one JSON object on stdout."),
) -> None:
    """Re-arrange PATH's quantized weights as another checkpoint layout, without dequantizing.

    Codes, zero points and group order (g_idx) are copied unchanged. Scales keep their values where the target
    can hold their dtype; the GPTQ layout stores float16 scales, so wider (float32, bfloat16) scales are
    rounded to float16, and the output says the largest relative change.
    """
    import time

    from compress.export.convert import FORMATS, convert_checkpoint
    from compress.pipeline.output_dir import staging_dir

    if to not in FORMATS:
        raise CompressError(f"--to {to!r} is not a layout we write; use {' or '.join(FORMATS)}")
    source = Path(path)
    if source.resolve() == output.resolve():
        raise CompressError("--output must be a different folder than the checkpoint being converted")
    start = time.perf_counter()
    with staging_dir(output, overwrite, source=source) as staging:  # never inside or around the source
        summary = convert_checkpoint(source, staging, to)
    summary.update({"output": str(output), "timings": {"total_s": time.perf_counter() - start}})
    if as_json:
        print_json(summary)
        return
    rows = [("source", f"{summary['source']} ({summary['from']})"), ("output", f"{summary['output']} ({to})"),
            ("layers", f"{summary['layers']} ({summary['scheme']})"),
            ("kept", _and(summary["unchanged"]) + " copied unchanged"), ("scales", scales_change(summary)),
            ("copied", ", ".join(summary["copied"]) or "-"), ("wall time", f"{summary['timings']['total_s']:.1f} s")]
    out.print(key_value_table("compress convert: done", rows))


def scales_change(summary: dict) -> str:
    """``scales float32 → float16 (max relative change 3e-04)`` or ``float16, unchanged``."""
    scales = summary["scales"]
    if scales["from"] == scales["to"] and not scales["max_relative_change"]:
        return f"{scales['from']}, unchanged"
    return f"{scales['from']} → {scales['to']} (max relative change {scales['max_relative_change']:.1e})"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
