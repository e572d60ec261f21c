"""Recipes from YAML files, built-in presets, ``--set`` overrides and CLI flags — all into one ``Recipe``.

YAML is read with ``safe_load`` only: a recipe is data, it can never name a Python object to import.
Validation errors become one ``CompressError`` line naming every problem and its field path, e.g.
``recipe field stages.0.bits: Input should be 2, 3, 4 or 8`` or ``recipe has an unknown key 'stges' at the
top level (did you mean 'stages'?)``.
"""

from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from compress.core.errors import CompressError
from compress.passes import PASSES
from compress.recipes.schema import Recipe

_PRESET_PACKAGE = "compress.recipes.presets"


_MAX_PROBLEMS = 4
"""Problems named in one message; the rest are counted, so the sentence stays one line."""


def validation_message(error: ValidationError, what: str = "recipe") -> str:
    """Every validation problem (up to ``_MAX_PROBLEMS``) in one line, each naming its dotted field path:
    ``recipe has an unknown key 'stges' at the top level (did you mean 'stages'?)``,
    ``recipe field stages.0.bits: Input should be 2, 3, 4 or 8``."""
    problems = error.errors()
    typos = {(clean_loc(e["loc"])[:-1], hint) for e in problems if e["type"] == "extra_forbidden"
             for hint in [_suggestion(e["loc"])] if hint}
    # a typo of a required key shows up twice (unknown 'stges', missing 'stages'): name it once, as the typo
    problems = [e for e in problems
                if not (e["type"] == "missing" and e["loc"]
                        and (clean_loc(e["loc"])[:-1], clean_loc(e["loc"])[-1]) in typos)]
    phrases = [problem_phrase(e) for e in problems[:_MAX_PROBLEMS]]
    more = len(problems) - len(phrases)
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{what} {'; '.join(phrases)}{suffix}"


def _stage_method(loc: tuple) -> str | None:
    """The method pydantic put into the location of a stage's field (``stages.0.rtn.bits`` → ``rtn``)."""
    if len(loc) >= 3 and loc[0] == "stages" and isinstance(loc[2], str) and loc[2] in PASSES:
        return loc[2]
    return None


def clean_loc(loc: tuple) -> tuple[str, ...]:
    """The dotted field path as a user writes it: pydantic's union tags (``stages.0.rtn.bits``) dropped."""
    parts = [str(part) for part in loc if not (isinstance(part, str) and part.startswith("function-"))]
    if _stage_method(loc) is not None:
        del parts[2]
    return tuple(parts)


def error_reason(error: dict) -> str:
    """pydantic's message without the 'Value error, ' it puts before what our validators raise."""
    reason = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if reason.startswith(prefix):
            return reason[len(prefix):]
    return reason


def _where(parent: tuple[str, ...]) -> str:
    return ".".join(parent) if parent else "the top level"


def problem_phrase(error: dict) -> str:
    """One problem as a phrase that follows 'recipe' (or 'option'), naming where it is."""
    kind, loc = error["type"], clean_loc(error["loc"])
    if kind == "extra_forbidden" and loc:
        hint = _suggestion(error["loc"])
        if hint:
            return f"has an unknown key '{loc[-1]}' at {_where(loc[:-1])} (did you mean '{hint}'?)"
        allowed = _allowed_keys(error["loc"])
        listed = f" (allowed: {', '.join(sorted(allowed))})" if allowed else ""
        return f"has an unknown key '{loc[-1]}' at {_where(loc[:-1])}{listed}"
    if kind == "missing" and loc:
        return f"is missing the required field '{loc[-1]}' at {_where(loc[:-1])}"
    if kind == "union_tag_invalid":
        tag = str(error.get("ctx", {}).get("tag", ""))
        close = difflib.get_close_matches(tag, PASSES.names(), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(PASSES.names()))}"
        return f"has an unknown method '{tag}' at {_where(loc)} ({hint})"
    if kind == "union_tag_not_found":
        return f"has no method at {_where(loc)} (give method: one of {', '.join(sorted(PASSES.names()))})"
    if not loc:  # a check across fields (a model validator): its message is written to follow 'recipe'
        return error_reason(error)
    method = _stage_method(error["loc"])
    if method is not None and len(error["loc"]) == 3:  # a check across one stage's fields
        return f"field {'.'.join(loc)} ({method}): {error_reason(error)}"
    return f"field {'.'.join(loc)}: {error_reason(error)}"


def _allowed_keys(raw_loc: tuple) -> list[str]:
    """The keys accepted by the mapping that holds the unknown key at ``raw_loc`` ([] when unknown)."""
    from compress.recipes.schema import CalibrationConfig, EvalConfig, ExportConfig

    method = _stage_method(raw_loc)
    if method is not None and len(raw_loc) == 4:
        return list(PASSES.get(method).config_cls.model_fields)
    parent = clean_loc(raw_loc)[:-1]
    sections = {"calibration": CalibrationConfig, "eval": EvalConfig, "export": ExportConfig}
    if not parent:
        return list(Recipe.model_fields)
    if len(parent) == 1 and parent[0] in sections:
        return list(sections[parent[0]].model_fields)
    return []


def _suggestion(raw_loc: tuple) -> str | None:
    """The accepted key closest to the unknown one (difflib), if one is close enough."""
    if not raw_loc:
        return None
    close = difflib.get_close_matches(str(raw_loc[-1]), _allowed_keys(raw_loc), n=1, cutoff=0.6)
    return close[0] if close else None


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
