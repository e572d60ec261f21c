"""Recipes from YAML files, built-in presets, ``--set`` overrides and CLI flags — all into one ``Recipe``.

YAML is read with ``safe_load`` only: a recipe is data, it can never name a Python object to import.
Validation errors become one ``CompressError`` sentence naming the field path, e.g.
``recipe field stages.0.bits: Input should be 2, 3, 4 or 8``.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from compress.core.errors import CompressError
from compress.passes import PASSES
from compress.recipes.schema import Recipe

_PRESET_PACKAGE = "compress.recipes.presets"


def validation_message(error: ValidationError, what: str = "recipe") -> str:
    """The first validation problem as one sentence with its dotted field path."""
    first = error.errors()[0]
    # pydantic puts the union tag (e.g. 'rtn') into the location of discriminated members; drop it.
    loc = [str(part) for part in first["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
    if len(loc) >= 3 and loc[0] == "stages" and loc[2] in PASSES:  # the union tag pydantic adds: stages.0.rtn.bits
        del loc[2]
    path = ".".join(loc) or "(top level)"
    reason = first["msg"]
    if first["type"] == "extra_forbidden":
        reason = "unknown key"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{what} field {path}: {reason}{suffix}"


def recipe_from_dict(data: Any, what: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise CompressError(f"{what} must be a mapping of keys to values, not {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise CompressError(validation_message(error, what)) from None


def read_yaml(path: Path) -> Any:
    if not path.exists():
        raise CompressError(f"recipe file {path} does not exist")
    if not path.is_file():
        raise CompressError(f"recipe path {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
        return yaml.safe_load(text)
    except UnicodeDecodeError:
        raise CompressError(f"recipe file {path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise CompressError(f"recipe file {path} is not valid YAML{where}") from None
    except RecursionError:  # e.g. thousands of nested brackets: the parser recurses per level
        raise CompressError(f"recipe file {path} nests too deeply to be a recipe") from None


def preset_names() -> list[str]:
    files = resources.files(_PRESET_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    if name not in preset_names():
        raise CompressError(f"no built-in recipe named {name!r}; known: {', '.join(preset_names())}")
    return resources.files(_PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def load_recipe_data(source: str) -> dict[str, Any]:
    """A recipe file path, or the name of a built-in preset, as a raw mapping."""
    path = Path(source)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        data = read_yaml(path)
    else:
        data = yaml.safe_load(preset_text(source))
    if data is None:
        raise CompressError(f"recipe {source} is empty")
    if not isinstance(data, dict):
        raise CompressError(f"recipe {source} must be a mapping of keys to values")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.path=value`` pairs applied to the raw mapping; values are parsed as YAML scalars/lists."""
    result = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CompressError(f"--set expects key.path=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except (yaml.YAMLError, RecursionError):
            raise CompressError(f"--set {key}: value {raw!r} is not valid YAML") from None
        _set_path(result, key.split("."), value, item)
    return result


def _set_path(node: Any, parts: list[str], value: Any, item: str) -> None:
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise CompressError(f"--set {item}: {'.'.join(parts[:depth + 1])} is not an index of the list")
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise CompressError(f"--set {item}: {'.'.join(parts[:depth])} is not a mapping or list")


def load_recipe(source: str, overrides: list[str] | None = None) -> Recipe:
    data = apply_overrides(load_recipe_data(source), overrides or [])
    return recipe_from_dict(data)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML; re-running it reproduces the artifact."""
    data = recipe.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)
