"""``compress export``: a quantized checkpoint written as a single-file format for another runtime (GGUF)."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli._output import key_value_table, out, print_json
from compress.cli._params import flag
from compress.cli.errors import handle_errors
from compress.core.errors import CompressError

FORMATS = ("gguf",)
GGUF_MAGIC = b"GGUF"


@handle_errors
def export(
    path: str = typer.Argument(..., help="A quantized checkpoint folder of compress (compressed-tensors layout)."),
    fmt: str = typer.Option(..., "--format", help="Target format: gguf (llama.cpp)."),
    output_file: str = typer.Option(..., "--output", "-o", metavar="<file>",
                                    help="Output file, e.g. model.gguf (written whole or not at all)."),
    overwrite: bool = flag("--overwrite", "Replace an existing GGUF file (never any other file)."),
    as_json: bool = flag("--json", "Print one JSON object on stdout."),
) -> None:
    """Write PATH as a llama.cpp GGUF file, copying the integer codes (never re-quantizing).

    Symmetric int4, asymmetric int4 and symmetric int8 weights in groups of 32 become Q4_0, Q4_1 and Q8_0 blocks
    of a llama-architecture model; other schemes, groupings and architectures are refused. Block scales are
    float16 in GGUF: wider scales are rounded to nearest, and the output says the largest difference measured.
    """
    import time

    from compress.pipeline.output_file import staging_file

    if fmt not in FORMATS:
        raise CompressError(f"--format {fmt!r} is not a format export writes; use gguf (for the "
                            "compressed-tensors or GPTQ layouts use compress convert)")
    from compress.export.gguf import export_gguf, require_gguf

    require_gguf()  # a missing extra is said before any file is checked
    source = Path(path)
    target = Path(output_file)
    start = time.perf_counter()
    with staging_file(target, overwrite, magic=GGUF_MAGIC, kind="GGUF", source=source) as staging:
        summary = export_gguf(source, staging)
    summary.update({"output": str(target), "timings": {"total_s": time.perf_counter() - start}})
    if as_json:
        print_json(summary)
        return
    types = ", ".join(f"{count} {kind}" for kind, count in summary["types"].items())
    rows = [("source", summary["source"]), ("output", f"{summary['output']} (GGUF, {summary['architecture']})"),
            ("tensors", f"{summary['tensors']} ({types})"),
            ("size", f"{summary['bytes'] / 1e6:.2f} MB (checkpoint weights {summary['checkpoint_bytes'] / 1e6:.2f} MB)"),
            ("scales", scales_line(summary["scales"])),
            ("wall time", f"{summary['timings']['total_s']:.1f} s")]
    out.print(key_value_table("compress export: done", rows))


def scales_line(scales: dict) -> str:
    """``float16, copied exactly`` or ``float32 → float16 (max difference 3.0e-05, 0.004 steps)``."""
    if scales["exact"]:
        return f"{scales['from']}, copied exactly"
    return (f"{scales['from']} → {scales['to']} (max weight difference {scales['max_abs_error']:.1e}, "
            f"{scales['max_error_steps']:.3f} quantization steps)")
