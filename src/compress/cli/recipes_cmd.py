"""``compress recipes list|show``: the built-in recipes."""

from __future__ import annotations

import typer

from compress.cli._output import out, print_json, write_raw
from compress.cli._params import Command, Group, flag
from compress.cli.errors import handle_errors

recipes_app = typer.Typer(help="Built-in recipes.", no_args_is_help=True, cls=Group)


@recipes_app.command("list", cls=Command)
@handle_errors
def list_recipes(as_json: bool = flag("--json", "Print one JSON object.")) -> None:
    """List the built-in recipe names with their first comment line."""
    from compress.recipes.loader import preset_names, preset_text

    entries = {}
    for name in preset_names():
        first = preset_text(name).splitlines()[0]
        entries[name] = first.lstrip("# ").strip() if first.startswith("#") else ""
    if as_json:
        print_json({"recipes": entries})
        return
    for name, summary in entries.items():
        out.print(f"[bold]{name}[/bold]  {summary}")


@recipes_app.command("show", cls=Command)
@handle_errors
def show_recipe(name: str = typer.Argument(..., help="A built-in recipe name.")) -> None:
    """Print a built-in recipe's YAML, exactly as stored (``> my.yaml`` to start your own)."""
    from compress.recipes.loader import preset_text

    write_raw(preset_text(name))  # never through rich: it would wrap long comment lines into invalid YAML
