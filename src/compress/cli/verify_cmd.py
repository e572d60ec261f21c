"""``compress verify PATH``: re-hash a release folder against its manifest.json.

Exit 0 when every file matches, 1 when any file is missing, changed or was added (each named on
stderr), 2 when there is no readable manifest to check against (bad input, like any other).
"""

from __future__ import annotations

import typer

from compress.cli._output import err, info, print_json
from compress.cli._params import flag
from compress.cli.errors import handle_errors


@handle_errors
def verify(
    path: str = typer.Argument(..., help="An output folder written by compress (holds manifest.json)."),
    as_json: bool = flag("--json", "Print one JSON object on stdout."),
) -> None:
    """Check every file of PATH against the sha256 recorded in its manifest.json."""
    from pathlib import Path

    from compress.export.manifest import read_manifest, verify_manifest

    folder = Path(path)
    checked = len(read_manifest(folder)["files"])
    problems = verify_manifest(folder)
    if as_json:
        print_json({"output": str(folder), "ok": not problems, "files_checked": checked, "problems": problems})
    for problem in problems:
        err.print(f"error: {problem['message']}", markup=False, highlight=False)
    if problems:
        raise typer.Exit(1)
    if not as_json:
        info(f"{folder}: all {checked} files match manifest.json")
