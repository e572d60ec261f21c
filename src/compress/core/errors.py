"""The error types that decide a CLI exit code.

Library code raises these; only ``compress.cli`` turns them into exit codes and one-line messages:
``CompressError`` (bad input) exits 2, ``GateFailed`` exits 3, anything else is a bug and exits 1.
"""

from __future__ import annotations


class CompressError(Exception):
    """Bad input from the user: a path, a recipe, a dataset, a checkpoint. The message is one sentence."""


class GateFailed(Exception):
    """An evaluation threshold was exceeded; carries the report so ``--json`` can still print it."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}
