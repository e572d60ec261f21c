"""PNG charts of comparisons (the ``plots`` extra: matplotlib), drawn headless.

Why a picture: choosing among outputs is a trade-off between bytes and quality, which a scatter of size
against KL shows at a glance (the Pareto front is the lower-left edge) where a table has to be read row by row.
"""

from __future__ import annotations

from pathlib import Path

from compress.core.errors import CompressError
from compress.evaluate.compare import OutputSummary, quality_axis

PNG_MAGIC = b"\x89PNG"
INSTALL = "pip install 'compress-toolkit[plots]'"


def require_matplotlib() -> None:
    """One sentence naming the install when the extra is missing (said before any file is touched)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CompressError(f"plots need matplotlib, which is not installed; {INSTALL} adds it") from None


def size_vs_quality_png(rows: list[OutputSummary], target: Path) -> dict[str, object]:
    """Scatter of size (MB) against the quality metric of ``quality_axis``, one labelled point per output,
    written to ``target`` as PNG. Outputs without that metric are left out and named in the result; a log
    scale is used when the metric spans more than a factor of 20."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; the same bytes on a laptop and in CI
    from matplotlib import pyplot as plt

    key, axis_label = quality_axis(rows)
    points = []
    for row in rows:
        value = row.metrics.get(key)
        if value is None or row.size_bytes is None:
            continue
        points.append((row.label, row.size_bytes / 1e6, 1.0 - value if key == "cosine" else value))
    if not points:
        raise CompressError("no output has both a size and a quality value to plot")
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        axes.scatter([p[1] for p in points], [p[2] for p in points], color="#1f77b4", zorder=3)
        for label, x, y in points:
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        values = [p[2] for p in points if p[2] > 0]
        if len(values) > 1 and max(values) / min(values) > 20:
            axes.set_yscale("log")
        axes.set_xlabel("size on disk (MB)")
        axes.set_ylabel(axis_label)
        axes.set_title("size against quality loss (lower left is better)")
        axes.grid(True, alpha=0.3, zorder=0)
        figure.tight_layout()
        figure.savefig(target, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    finally:
        plt.close(figure)
    plotted = {label for label, _, _ in points}
    return {"metric": key, "points": len(points), "left_out": [r.label for r in rows if r.label not in plotted]}
