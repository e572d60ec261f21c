"""What the terminal shows around the work: --help of every command, --version, raw recipe text, eval --dry-run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from compress.cli.main import app

runner = CliRunner()


def _command_paths(command=None, prefix=()) -> list[tuple[str, ...]]:
    command = command or get_command(app)
    paths = [prefix]
    for name, sub in getattr(command, "commands", {}).items():
        paths += _command_paths(sub, (*prefix, name))
    return paths


COMMANDS = _command_paths()


def _help(path: tuple[str, ...]) -> str:
    result = runner.invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_covered():
    assert {("quantize",), ("prune",), ("eval",), ("convert",), ("recipes", "show")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "compress")
def test_help_has_no_type_tag_on_switches(path):
    text = _help(path)
    assert "<bool>" not in text
    for pointless in ("--no-overwrite", "--no-dry-run", "--no-json", "--no-resume", "--no-trust-remote-code",
                      "--no-allow-pickle"):
        assert pointless not in text
    assert "--help" in text


def _defaults_in_help(path: tuple[str, ...]) -> dict[str, str]:
    """``{--flag: shown default}`` from the options' help texts (what --help renders)."""
    command = get_command(app).commands[path[0]]
    shown = {}
    for param in command.params:
        match = re.search(r"\\\[default: ([^\]]+)\]", param.help or "")
        if match and param.opts:
            shown[param.opts[0]] = match.group(1)
    return shown


@pytest.mark.parametrize(("command", "preset"), [("quantize", "w4a16-gptq"), ("prune", "sparse50-sparsegpt")])
def test_help_defaults_are_the_default_recipe(command, preset):
    """Options default to None (a recipe may set them); the default the help states is what the run uses."""
    from compress.recipes.flags import FLAG_FIELDS, recipe_from_flags
    from compress.recipes.loader import load_recipe_data

    recipe = recipe_from_flags(load_recipe_data(preset), {}).model_dump(mode="json")
    field_of = {flag.split("/")[0]: path for path, flag in FLAG_FIELDS.items()}
    field_of["--format"] = "export.format"
    shown = _defaults_in_help((command,))
    checked = 0
    for flag, text in shown.items():
        path = field_of.get(flag)
        if path is None:
            continue
        node = recipe
        for part in path.replace("stages.*", "stages.0").split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, bool):
            node = flag if node else "--no-" + flag.removeprefix("--")
        elif isinstance(node, list):
            node = ", ".join(node)
        elif node is None:  # resolved at run time (seq_len, windows): the help says how
            continue
        assert text == str(node) or text.startswith(f"{node} for "), flag  # "mse for gptq, minmax for rtn"
        checked += 1
    assert checked >= 8
    assert shown["--recipe"] == preset


def test_version_prints_the_distribution_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"compress {version('compress-toolkit')}\n"


def test_version_does_not_import_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "compress.cli.main", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("compress ")
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "typer" in imported and "torch" not in imported


def test_recipes_show_prints_every_preset_as_valid_yaml():
    """Redirected to a file, the output is the preset itself: rich used to wrap long comment lines (the
    continuation had no '#', so the file was invalid YAML)."""
    from compress.recipes.loader import preset_names, preset_text

    names = preset_names()
    assert names
    for name in names:
        result = runner.invoke(app, ["recipes", "show", name], terminal_width=60)
        assert result.exit_code == 0, result.output
        assert result.stdout == preset_text(name), name
        assert yaml.safe_load(result.stdout) == yaml.safe_load(preset_text(name)), name


def test_eval_dry_run_prints_yaml_or_json():
    result = runner.invoke(app, ["eval", "some/folder", "--baseline", "base", "--seq-len", "64", "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = yaml.safe_load(result.stdout)
    assert plan["dry_run"] is True and plan["path"] == "some/folder" and plan["baseline"] == "base"
    assert plan["eval"]["seq_len"] == 64 and plan["eval"]["dataset"] == "demo-heldout"
    as_json = runner.invoke(app, ["eval", "some/folder", "--seq-len", "64", "--dry-run", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["eval"] == {**plan["eval"]}
