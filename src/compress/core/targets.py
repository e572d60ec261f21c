"""Which modules a pattern names: the one matcher behind ``--ignore``, recipe ``targets`` and ``ignore``.

Two spellings, so recipes written for compressed-tensors / llm-compressor keep working:

- ``re:<regex>``: ``re.match`` against the full dotted module name (anchored at the start only, exactly as
  compressed-tensors does), e.g. ``re:.*mlp\\.down_proj$``.
- anything else is an ``fnmatch`` glob, case-sensitive. It matches the full name (``*.mlp.down_proj``) or any
  trailing run of name components (``down_proj``, ``mlp.down_proj``, ``lm_head``), because users write the
  short layer name and expect every block's copy of it to match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fnmatch import fnmatchcase
from functools import lru_cache

from compress.core.errors import CompressError

__all__ = ["check_pattern", "check_patterns", "matches", "matches_any"]

_REGEX_PREFIX = "re:"


@lru_cache(maxsize=512)
def _compile(regex: str) -> re.Pattern[str]:
    """Patterns are matched against every layer of a model, so compile each one once."""
    try:
        return re.compile(regex)
    except (re.error, RecursionError, OverflowError) as error:
        raise CompressError(_bad_regex(_REGEX_PREFIX + regex, error)) from None


def _bad_regex(pattern: str, error: BaseException) -> str:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"pattern {pattern!r} is not a valid regular expression ({reason})"


def check_pattern(pattern: str) -> str:
    """``pattern`` unchanged if it can be matched; ``CompressError`` naming it when its ``re:`` regex does not
    compile (globs always do). Recipes call this when they are built, so a bad pattern never reaches a model."""
    if not isinstance(pattern, str):
        raise CompressError(f"pattern {pattern!r} is not a string")
    if pattern.startswith(_REGEX_PREFIX):
        _compile(pattern[len(_REGEX_PREFIX) :])
    return pattern


def check_patterns(patterns: Iterable[str]) -> list[str]:
    """Every pattern checked with :func:`check_pattern`, as a list."""
    return [check_pattern(p) for p in patterns]


def matches(name: str, pattern: str) -> bool:
    """True when ``pattern`` names the module ``name`` (see the module docstring for the two spellings)."""
    if pattern.startswith(_REGEX_PREFIX):
        return _compile(pattern[len(_REGEX_PREFIX) :]).match(name) is not None
    if fnmatchcase(name, pattern):
        return True
    parts = name.split(".")
    # Trailing components only: "down_proj" names model.layers.3.mlp.down_proj but "mlp" does not name it.
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(1, len(parts)))


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True when any pattern matches; a bare string is one pattern, not an iterable of characters."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(matches(name, p) for p in patterns)
