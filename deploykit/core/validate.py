"""Records read back from files (stores, runs files) checked against their dataclass before use.

A record deploykit wrote comes back through JSON, and so does one somebody edited or made up: a
batch of "lots", -7 threads, 10^30 samples or 1e38 bytes on disk would be stored as given and break
every report that reads them later. `from_json` builds a dataclass from JSON values only when each
field is of its annotated type (a bool is never a number, an int field takes no float), numbers are
finite and within the field's range, and nested records pass the same checks; the error names the
field. Ranges sit with the fields, as `dataclasses.field(metadata=...)` (`at_least`, `between`);
integers default to what a store can hold (0 .. 2^63 - 1).

Why not a library: pydantic would do it but is not in the stack, and the records are plain frozen
dataclasses on purpose (DESIGN.md); these few annotations are all the records use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

#: SQLite's INTEGER and numpy's int64 hold up to this
INT_MAX = 2**63 - 1


class RecordError(ValueError):
    """A value that does not fit its field; the message names the field."""


def at_least(low: float) -> dict[str, Any]:
    """Field metadata: a number >= `low`."""
    return {"min": low}


def between(low: float, high: float) -> dict[str, Any]:
    """Field metadata: a number in [low, high]."""
    return {"min": low, "max": high}


#: field metadata: a float that may be inf or NaN (a parity error of outputs that overflowed)
NON_FINITE = {"finite": False}


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _number(value: Any, kind: type, where: str, rules: dict[str, Any]) -> Any:
    if kind is int and isinstance(value, float) and value.is_integer() and abs(value) <= INT_MAX:
        # a whole number written as a float (the median of an even count of integers: 161.0) is that integer
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RecordError(f"{where} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if kind is float and not math.isfinite(value):
        if rules.get("finite", True):
            raise RecordError(f"{where} must be finite, got {value!r}")
        return float(value)
    low, high = rules.get("min", 0 if kind is int else -math.inf), rules.get("max", INT_MAX if kind is int else math.inf)
    if not low <= value <= high:
        raise RecordError(f"{where} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value) if kind is float else value


def check(value: Any, annotation: Any, where: str, rules: dict[str, Any] | None = None) -> Any:
    """`value` (from JSON) as `annotation` asks: checked, tuples made from lists, dataclasses built."""
    rules = rules or {}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (list, tuple, dict):
        origin = annotation
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return check(value, option, where, rules)
            except RecordError as exc:
                errors.append(str(exc))
        raise RecordError(errors[0] if len(errors) == 1 else f"{where} is not one of its types: {'; '.join(errors)}")
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecordError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation in (int, float):
        return _number(value, annotation, where, rules)
    if annotation is str:
        if not isinstance(value, str):
            raise RecordError(f"{where} must be a string, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where} must be an object, got {type(value).__name__}")
        key_type, value_type = args or (Any, Any)
        return {check(k, key_type, f"{where} key", {}): check(v, value_type, f"{where}[{k!r}]", rules)
                for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecordError(f"{where} must be a list, got {type(value).__name__}")
        item = args[0] if args else Any
        items = [check(v, item, f"{where}[{i}]", rules) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(annotation):
        try:
            return annotation(**from_json(annotation, value, where))
        except RecordError:
            raise
        except ValueError as exc:  # the dataclass's own check of its fields together
            raise RecordError(f"{where}: {exc}") from None
    raise TypeError(f"{where}: no check for annotation {annotation!r}")  # a field type this module lacks: our bug


def from_json(cls: type, data: Any, where: str = "") -> dict[str, Any]:
    """The keyword arguments of dataclass `cls` from the JSON object `data`: its fields only (others,
    such as derived statistics, are ignored), each checked; a required field missing is an error."""
    if not isinstance(data, dict):
        raise RecordError(f"{where or cls.__name__} must be an object, got {type(data).__name__}")
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        name = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{name} is missing")
            continue
        values[f.name] = check(data[f.name], hints[f.name], name, dict(f.metadata))
    return values
