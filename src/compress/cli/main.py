"""The ``compress`` console script. Commands are thin: they build a Recipe or call one library function.

Nothing heavy is imported here (``compress --help`` does not import torch); commands import inside.
"""

from __future__ import annotations

import typer

from compress.cli._params import Command, Group
from compress.cli.bench_cmd import bench
from compress.cli.compare_cmd import compare
from compress.cli.convert_cmd import convert
from compress.cli.evaluate import evaluate
from compress.cli.export_cmd import export
from compress.cli.inspect_cmd import inspect
from compress.cli.prune import prune
from compress.cli.quantize import quantize
from compress.cli.recipes_cmd import recipes_app
from compress.cli.run_cmd import run
from compress.cli.verify_cmd import verify

DISTRIBUTION = "compress-toolkit"

app = typer.Typer(
    name="compress",
    help="Make Hugging Face models smaller and faster: quantize, evaluate, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Group,
)
for _name, _command in (("quantize", quantize), ("prune", prune), ("eval", evaluate), ("run", run),
                        ("inspect", inspect), ("bench", bench), ("convert", convert), ("export", export),
                        ("verify", verify), ("compare", compare)):
    app.command(_name, cls=Command)(_command)
app.add_typer(recipes_app, name="recipes")


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version(DISTRIBUTION)
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "unknown (not installed)"
    typer.echo(f"compress {found}")
    raise typer.Exit(0)


@app.callback()
def _main(
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                      help="Print the version and exit."),
) -> None:
    """Make Hugging Face models smaller and faster: quantize, evaluate, export."""


if __name__ == "__main__":  # pragma: no cover
    app()
