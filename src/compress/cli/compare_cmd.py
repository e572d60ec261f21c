"""``compress compare PATH...``: outputs side by side (size, ppl, KL, top-1), as a table, Markdown or JSON,
and optionally a size-vs-KL PNG."""

from __future__ import annotations

import typer

from compress.cli._output import out, print_json, write_raw
from compress.cli._params import flag
from compress.cli.errors import handle_errors


@handle_errors
def compare(
    paths: list[str] = typer.Argument(..., help="Output folders written by compress quantize, prune or run."),
    markdown: bool = flag("--markdown", "Print a Markdown table (e.g. for a CI step summary)."),
    plot: str | None = typer.Option(None, "--plot", metavar="<file.png>",
                                    help="Also write a size-vs-KL scatter as PNG (needs the plots extra)."),
    overwrite: bool = flag("--overwrite", "Replace an existing PNG at --plot (never any other file)."),
    as_json: bool = flag("--json", "Print one JSON object on stdout."),
) -> None:
    """Tabulate what each output cost and lost, from the report.json each one holds (nothing is re-run).

    Outputs evaluated on different text or made from different models are flagged (their metrics do not measure the same thing).
    """
    from pathlib import Path

    from compress.core.errors import CompressError
    from compress.evaluate.compare import compare_outputs, markdown_table

    if markdown and as_json:
        raise CompressError("--markdown and --json each print the whole result; choose one")
    plan = None
    if plot is not None:
        from compress.evaluate.plots import PNG_MAGIC, require_matplotlib, size_vs_quality_png
        from compress.pipeline.output_file import check_output_file, staging_file

        if not plot.lower().endswith(".png"):
            raise CompressError(f"--plot {plot} must name a .png file")
        require_matplotlib()
        for folder in paths:  # a file added to an output folder would no longer match its manifest
            check_output_file(Path(plot), overwrite, magic=PNG_MAGIC, kind="PNG", source=folder)
        plan = Path(plot)
    rows, notes = compare_outputs(paths)
    plotted = None
    if plan is not None:
        with staging_file(plan, overwrite, magic=PNG_MAGIC, kind="PNG") as staging:
            plotted = {"file": str(plan), **size_vs_quality_png(rows, staging)}
    if as_json:
        print_json({"outputs": [row.to_dict() for row in rows], "notes": notes, "plot": plotted})
        return
    if markdown:
        write_raw(markdown_table(rows, notes) + "\n")
        return
    _print_table(rows, notes)
    if plotted is not None:
        out.print(f"plot: {plotted['file']} ({plotted['points']} outputs, {plotted['metric']})")


def _print_table(rows, notes) -> None:
    """A rich table with only the columns some output fills (a terminal is narrow), the notes under it."""
    from rich.table import Table

    from compress.cli._output import fmt, human_bytes

    def pct(value: float | None, spec: str) -> str:
        return "-" if value is None else f"{value * 100:{spec}}%"

    columns = {
        "output": [row.label for row in rows],
        "method": [", ".join(row.methods) or "-" for row in rows],
        "scheme": [", ".join(row.schemes) or "-" for row in rows],
        "size": [human_bytes(row.size_bytes) for row in rows],
        "ratio": ["-" if row.compression_ratio is None else f"{row.compression_ratio:.2f}x" for row in rows],
        "ppl": [fmt(row.metrics.get("ppl"), 3) for row in rows],
        "ppl +": [pct(row.metrics.get("ppl_increase"), "+.2f") for row in rows],
        "KL": ["-" if "kl" not in row.metrics else f"{row.metrics['kl']:.5f}" for row in rows],
        "top-1": [pct(row.metrics.get("top1"), ".1f") for row in rows],
        "cosine": [fmt(row.metrics.get("cosine"), 4) for row in rows],
    }
    shown = {name: cells for name, cells in columns.items() if any(cell != "-" for cell in cells)}
    table = Table(title="compress compare", title_justify="left")
    for name in shown:
        table.add_column(name, no_wrap=name != "output")
    for index in range(len(rows)):
        table.add_row(*(cells[index] for cells in shown.values()))
    out.print(table)
    bases = {fmt(row.metrics.get("baseline_ppl"), 3) for row in rows if "baseline_ppl" in row.metrics}
    if bases:
        out.print(f"baseline ppl: {', '.join(sorted(bases))}", markup=False, highlight=False)
    for note in notes:
        out.print(f"note: {note}", markup=False, highlight=False)
