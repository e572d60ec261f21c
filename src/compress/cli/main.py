"""The ``compress`` console script. Commands are thin: they build a Recipe or call one library function.

Nothing heavy is imported here (``compress --help`` does not import torch); commands import inside.
"""

from __future__ import annotations

import typer

from compress.cli.bench_cmd import bench
from compress.cli.convert_cmd import convert
from compress.cli.evaluate import evaluate
from compress.cli.inspect_cmd import inspect
from compress.cli.prune import prune
from compress.cli.quantize import quantize
from compress.cli.recipes_cmd import recipes_app
from compress.cli.run_cmd import run
from compress.cli.verify_cmd import verify

app = typer.Typer(
    name="compress",
    help="Make Hugging Face models smaller and faster: quantize, evaluate, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("quantize")(quantize)
app.command("prune")(prune)
app.command("eval")(evaluate)
app.command("run")(run)
app.command("inspect")(inspect)
app.command("bench")(bench)
app.command("convert")(convert)
app.command("verify")(verify)
app.add_typer(recipes_app, name="recipes")


if __name__ == "__main__":  # pragma: no cover
    app()
