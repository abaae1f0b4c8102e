"""TOML files the user hands deploykit (plans, budgets, profiles): read in one line of error, and
values checked against the type each key needs, naming the key and its line.

tomllib parses but reports no positions for valid keys, and TOML's own types are not ours (a
string "no" is not false; a sparsity must be a number): `check_value` is the one place that says so.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

from deploykit.core.errors import UsageError
from deploykit.core.fsutil import read_text


def read_toml(path: str | Path, what: str) -> tuple[dict[str, Any], str]:
    """(data, text) of a TOML file, or a one-line UsageError saying why "`what` PATH" cannot be read."""
    text = read_text(path, what, UsageError)
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"malformed {what} {str(path)!r}: {exc}") from None
    except RecursionError:  # tomllib recurses once per level of nesting
        raise UsageError(f"malformed {what} {str(path)!r}: nested too deeply") from None


def line_of(text: str, key: str) -> int | str:
    """Line number of `key = ...` or `[key]` in TOML text ("?" when not found)."""
    pattern = re.compile(rf'^\s*(\[\s*)?["\']?{re.escape(key)}["\']?\s*(=|\])')
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return "?"


#: what a value of each kind must be: booleans are never numbers, numbers are finite
_KINDS = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "list of strings": lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
    "table of numbers": lambda v: isinstance(v, dict) and all(
        isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item) for item in v.values()),
    "table of strings": lambda v: isinstance(v, dict) and all(isinstance(item, str) for item in v.values()),
}


def check_value(value: Any, kind: str, key: str, path: str | Path, text: str) -> Any:
    """`value` if it is of `kind` (a key of the table above), else a UsageError naming key and line."""
    if not _KINDS[kind](value):
        raise UsageError(f"{str(path)!r}, line {line_of(text, key)}: {key} must be a {kind}, got {value!r}")
    return value
