"""Name -> object registries (methods, models, datasets, attacks).

Besides its registered names, a registry may resolve a family of names ``PREFIX:REST`` through a function
(``resolve_prefix``): the datasets ``folder:PATH`` and ``npz:PATH`` are found this way (raydistill.userdata).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, TypeVar

from .errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """A small name registry whose lookup failures are user-facing one-line errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._prefixes: Dict[str, tuple[str, Callable[[str], T]]] = {}  # prefix -> (how it is written, resolver)

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def resolve_prefix(self, prefix: str, written: str, resolve: Callable[[str], T]) -> None:
        """Names ``prefix:REST`` are ``resolve(name)`` (which raises UsageError for a bad one); ``written``
        is how the family appears in the list of choices, e.g. ``folder:PATH``."""
        self._prefixes[prefix] = (written, resolve)

    def _family(self, name: Any) -> Callable[[str], T] | None:
        prefix, sep, _ = name.partition(":") if isinstance(name, str) else ("", "", "")
        return self._prefixes[prefix][1] if sep and prefix in self._prefixes else None

    def get(self, name: str) -> T:
        if name not in self._items and self._family(name) is not None:
            return self._family(name)(name)
        try:
            return self._items[name]
        except KeyError:
            choices = self.names() + [w for w, _ in self._prefixes.values()]
            raise UsageError(f"unknown {self.kind} '{name}'; choose from: {', '.join(choices)}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: Any) -> bool:
        """A registered name, or one of a resolved family (its form only: ``get`` checks what it names)."""
        return name in self._items or self._family(name) is not None

    def __iter__(self):
        return iter(self._items)
