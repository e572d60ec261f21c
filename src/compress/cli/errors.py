"""Errors mapped to exit codes once, for every command (DESIGN: CLI behaviour).

CompressError → one sentence on stderr, exit 2. GateFailed → its message, exit 3 (``--json`` still prints
the report). Ctrl-C → exit 130 (after a ``--resume`` run saved blocks: how many, and the command that
continues). Anything else is our bug → exit 1, traceback only with COMPRESS_DEBUG=1.

A command's ``output`` option reaches the command as typed (a string) and is made a ``Path`` here, because
``Path("")`` is ``Path(".")``: ``--output ''`` would otherwise silently mean the current folder.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import shlex
import signal
import threading
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from typer.models import ArgumentInfo, OptionInfo

from compress.cli._output import err, print_json, quiet_libraries
from compress.core.errors import CompressError, GateFailed
from compress.pipeline.output_dir import output_path

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        quiet_libraries()
        previous = _terminate_as_interrupt()
        try:
            if isinstance(kwargs.get("output"), str):
                kwargs["output"] = output_path(kwargs["output"])
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except CompressError as error:
            _fail(str(error), 2, as_json)
        except GateFailed as error:
            if as_json:
                print_json({**error.report, "error": str(error), "exit_code": 3})
            elif error.report:  # the metrics that failed the gate, then the verdict
                from compress.cli.common import print_report

                print_report(error.report)
            err.print(f"[red]gate failed:[/red] {error}", markup=True, highlight=False)
            raise typer.Exit(3) from None
        except KeyboardInterrupt as error:
            saved = getattr(error, "saved_blocks", 0)
            if saved:
                err.print(f"interrupted; {saved} finished block{'s' if saved != 1 else ''} saved in "
                          f"{error.folder}; to continue, run: {command_line(func, kwargs)}",
                          markup=False, highlight=False, soft_wrap=True)
            else:
                err.print("interrupted; no output was written")
            raise typer.Exit(130) from None
        except Exception as error:  # a bug or an environment failure, not the user's input
            if os.environ.get("COMPRESS_DEBUG") == "1":
                traceback.print_exc()
            message = f"internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            _fail(message + " (set COMPRESS_DEBUG=1 for the traceback)", 1, as_json)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    _output_as_typed(func, wrapper)
    return wrapper  # type: ignore[return-value]


def _output_as_typed(func: Callable[..., Any], wrapper: Callable[..., Any]) -> None:
    """Declare the ``output`` parameter as ``str`` on ``wrapper`` (what typer reads), so an empty value
    arrives as ``""`` and ``handle_errors`` can refuse it before it turns into the current folder."""
    declared = typing.get_type_hints(func).get("output")
    if declared not in (Path, Path | None):
        return
    raw = str if declared is Path else str | None
    signature = inspect.signature(func)
    params = []
    for param in signature.parameters.values():
        if param.name == "output":
            info = param.default
            if isinstance(info, OptionInfo) and info.metavar is None:
                info = copy.copy(info)  # the option object may be shared between commands: never change it
                info.metavar = "<path>"  # what --help shows for a Path
            param = param.replace(annotation=raw, default=info)
        params.append(param)
    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**func.__annotations__, "output": raw}


def command_line(func: Callable[..., Any], values: dict[str, Any]) -> str:
    """The command that re-runs ``func`` with ``values`` (every option that differs from its default), for
    the user to copy: ``compress quantize MODEL --bits 4 ... --resume``."""
    words = ["compress", func.__name__]
    options: list[str] = []
    for param in inspect.signature(func).parameters.values():
        info, value = param.default, values.get(param.name)
        if isinstance(info, ArgumentInfo):
            if value is not None:
                words.extend(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
            continue
        if not isinstance(info, OptionInfo) or value is None or value == info.default:
            continue
        decls = [d for d in (info.param_decls or ()) if isinstance(d, str)]
        names = [d for d in decls if d.startswith("--")] or [f"--{param.name.replace('_', '-')}"]
        if isinstance(value, bool):
            on, _, off = names[0].partition("/")
            if value or off:
                options.append(on if value else off)
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            options.extend([names[0], str(item)])
    return shlex.join([*words, *options])


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _terminate_as_interrupt() -> Any:
    """SIGTERM (``kill``, a CI timeout) unwinds like Ctrl-C, so temporary folders are cleaned up too."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _fail(message: str, code: int, as_json: bool) -> None:
    if as_json:
        print_json({"error": message, "exit_code": code})
    err.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(code)
