"""Errors mapped to exit codes once, for every command (DESIGN: CLI behaviour).

CompressError → one sentence on stderr, exit 2. GateFailed → its message, exit 3 (``--json`` still prints
the report). Ctrl-C → exit 130. Anything else is our bug → exit 1, traceback only with COMPRESS_DEBUG=1.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from compress.cli._output import err, print_json, quiet_libraries
from compress.core.errors import CompressError, GateFailed

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        quiet_libraries()
        previous = _terminate_as_interrupt()
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except CompressError as error:
            _fail(str(error), 2, as_json)
        except GateFailed as error:
            if as_json:
                print_json({**error.report, "error": str(error), "exit_code": 3})
            err.print(f"[red]gate failed:[/red] {error}", markup=True, highlight=False)
            raise typer.Exit(3) from None
        except KeyboardInterrupt:
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

    return wrapper  # type: ignore[return-value]


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
