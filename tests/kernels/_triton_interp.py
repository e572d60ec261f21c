"""Importing triton kernel modules for ``TRITON_INTERPRET=1`` (CPU tensors), shared by the triton tests.

Triton fixes interpreted vs compiled at ``import triton``, so the variable must be set before triton is first
imported. When nothing imported triton yet and there is no CUDA device, ``import_interpreted`` imports it (and
the given modules of ours, reloading one imported compiled) for the interpreter and returns True, as it does
when another test module already imported triton for the interpreter; otherwise (triton already imported
compiled, or a GPU session that must keep compiled triton) False, and the test
module re-runs itself in a subprocess with the variable set (``rerun_interpreted``).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def import_interpreted(*modules: str) -> bool:
    """True when triton and ``modules`` (each exposing ``INTERPRETED``) run under the interpreter here."""
    asked = os.environ.get("TRITON_INTERPRET") == "1"
    if not asked and "triton" not in sys.modules and torch.cuda.is_available():
        return False
    if "triton" in sys.modules:  # already imported: usable only if it was imported for the interpreter
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.cdiv, InterpretedFunction):
            return False
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        loaded = []
        for name in modules:
            module = importlib.import_module(name)
            if not module.INTERPRETED:
                module = importlib.reload(module)
            loaded.append(module.INTERPRETED)
        return isinstance(tl.cdiv, InterpretedFunction) and all(loaded)
    finally:
        if not asked:
            del os.environ["TRITON_INTERPRET"]


def rerun_interpreted(test_file: str) -> None:
    """Run ``test_file`` in a fresh interpreter with ``TRITON_INTERPRET=1``; fail with its output."""
    root = Path(test_file).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-p",
                           "no:cacheprovider"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.fixture(autouse=True)
def interpret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The triton paths accept CPU tensors only while the variable is set (imported into each triton test
    module, so it applies there only)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
