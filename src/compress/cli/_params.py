"""How options read in ``--help``, for every command: switches take no value, defaults are the real ones.

- ``Command`` / ``Group``: the command classes every command is registered with; a switch (an option that
  takes no value, ``--help`` included) gets no ``<bool>`` type tag.
- ``flag("--overwrite", ...)``: an off-unless-given switch, without a pointless ``--no-overwrite``.
- ``shown(help, default)``: the help text with ``[default: X]``. Options that a recipe can also set default to
  None (so an option left out does not override the recipe); this says what the default recipe uses.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup


class _ValuelessSwitches:
    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # typer's rich help would otherwise print <bool> after the switch
        return params


class Command(_ValuelessSwitches, TyperCommand):
    """A command whose switches show no type tag in ``--help``."""


class Group(_ValuelessSwitches, TyperGroup):
    """A command group whose switches (``--help``, ``--version``) show no type tag."""


def shown(help: str, default: str) -> str:
    """``help`` ending in ``[default: default]`` (escaped: typer renders help as rich markup)."""
    return f"{help} \\[default: {default}]"


def flag(name: str, help: str) -> Any:
    """A switch that is off unless given: ``--name`` only, no ``--no-name`` form."""
    return typer.Option(False, name, help=help)
