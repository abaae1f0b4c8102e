"""Paths named by data stay inside the data's own root.

A manifest, an ESPnet config, an artifact's pipeline config or an archive is data someone else may
have written. Every file it names is read relative to its root (the artifact directory, the
experiment directory or extracted zip), and a name that is absolute, climbs out with `..`, or
resolves outside the root through a symbolic link is refused in one line naming the key and the path.

`inside` checks one name at the point it is read. `check_named_paths` walks a whole config (every
key, not only the ones deploykit reads today: ESPnet's own builders read files named in their
configs too) and refuses any value that would lead out of the root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from deploykit.core.errors import ArtifactError


def _escape(root: Path, value: str) -> str | None:
    """Why `value`, read relative to `root`, leaves it; None if it stays inside."""
    if "\x00" in value:
        return "contains a NUL byte"
    path = Path(value)
    if path.is_absolute() or value.startswith("~"):
        return "is absolute"
    if os.path.normpath(value).split(os.sep)[0] == "..":
        return "climbs out with '..'"
    try:
        resolved = (root / path).resolve()
        if not resolved.is_relative_to(root.resolve()):
            return "resolves outside it through a symbolic link"
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        return f"cannot be resolved ({exc})"
    return None


def inside(root: str | os.PathLike, name: Any, key: str) -> Path:
    """`root / name`, where `name` is a relative path (read from data under key `key`) that stays in `root`."""
    root = Path(root)
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{str(root)!r}: {key} must name a file inside it, got {name!r}")
    reason = _escape(root, name)
    if reason:
        raise ArtifactError(f"{str(root)!r}: {key} = {name!r} {reason}; files named by data must stay inside "
                            f"{str(root)!r} (refused)")
    return root / name


def _strings(value: Any, key: str) -> Iterator[tuple[str, str]]:
    """(dotted key, string) for every string in a nested structure of dicts and lists."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, f"{key}[{i}]")


def _names_a_path(root: Path, value: str) -> bool:
    """Whether a config string is (or may be) a file reference: it has a path separator, starts with
    '~' or '..', or names something that exists under the root."""
    if not value or "\n" in value or len(value) > 4096:
        return False
    if "/" in value or os.sep in value or value.startswith(("~", "..")):
        return True
    try:
        return (root / value).exists()
    except (OSError, ValueError):
        return True


def check_named_paths(data: Any, root: str | os.PathLike, what: str, *, skip: tuple[str, ...] = (),
                      absolute_if_missing: bool = False) -> None:
    """Refuse `data` (a config or manifest record) if any string in it names a path outside `root`.

    `skip` lists top-level keys that are provenance, never read. `absolute_if_missing` lets an
    absolute path that does not exist here pass (a training machine's path in a config: nothing can
    be read through it; callers look such files up inside the root by name)."""
    root = Path(root)
    for key, value in _strings(data, ""):
        if key.split(".")[0].split("[")[0] in skip or not _names_a_path(root, value):
            continue
        expanded = Path(os.path.expanduser(value)) if value.startswith("~") else Path(value)
        if absolute_if_missing and expanded.is_absolute() and not os.path.lexists(expanded):
            continue
        reason = _escape(root, value)
        if reason:
            raise ArtifactError(f"{what}: {key} = {value!r} {reason}; files named by data must stay inside "
                                f"{str(root)!r} (refused)")


def read_json(root: str | os.PathLike, name: str, key: str) -> dict[str, Any]:
    """The JSON object in the file `name` inside `root` (an artifact's pipeline config), in one-line errors."""
    path = inside(root, name, key)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{str(root)!r} is missing {name}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{str(path)!r} is not a JSON object")
    return data
