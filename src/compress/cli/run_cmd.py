"""``compress run RECIPE.yaml``: the same job as the other commands, from a YAML recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli._params import flag
from compress.cli.common import execute_recipe
from compress.cli.errors import handle_errors


@handle_errors
def run(
    recipe: str = typer.Argument(..., help="Recipe YAML file or built-in recipe name."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a field: key.path=value (repeatable)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder (overrides the recipe)."),
    overwrite: bool = flag("--overwrite", "Replace a non-empty output folder."),
    resume: bool = flag("--resume", "Save each finished block; re-run the same command with --resume "
                                "after an interrupt to continue from the last saved block."),
    dry_run: bool = flag("--dry-run", "Print the resolved recipe and layers; load no weights."),
    as_json: bool = flag("--json", "Print one JSON object on stdout."),
) -> None:
    """Run a recipe end to end."""
    execute_recipe(recipe, {"output": str(output) if output else None}, overrides=set_ or [],
                   overwrite=overwrite, dry_run=dry_run, as_json=as_json, resume=resume)
