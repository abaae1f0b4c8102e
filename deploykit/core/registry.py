"""Name -> object registries filled by decorators.

Every extension point (models, pruners, forms, runtimes) is one `Registry`. Lookups of an unknown name
raise `UnknownNameError` listing the valid ones, so a typo on the command line is answered with the fix.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from deploykit.core.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A plain dict of named entries of one kind (`kind` names it in error messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        #: names whose entries a module registers when imported (kept lazy: such modules import torch)
        self._declared: dict[str, str] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def declare(self, name: str, module: str) -> None:
        """Make `name` known now; importing `module` (on first `get`) must `add` it."""
        self._declared[name] = module

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`: ``@FORMS.register("csr")``."""

        def decorate(entry: T) -> T:
            return self.add(name, entry)

        return decorate

    def get(self, name: str) -> T:
        if name not in self._entries and name in self._declared:
            importlib.import_module(self._declared[name])
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._declared))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._declared

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
