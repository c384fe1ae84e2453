"""Name -> object registries (methods, models, datasets, attacks), each entry with its origin.

An entry's origin is ``BUILT_IN`` or the plugin that registered it (a ``raydistill.plugins.Plugin``): while
a plugin is imported, :func:`registering_as` makes it the origin of every entry added. The first lookup
(``get``, ``names``, ``in``, iteration) of any registry loads the plugins this process is given without a
command line (installed packages' entry points, ``RAYDISTILL_PLUGINS``): so a Ray worker on any node finds a
plugin's names as the driver does (raydistill.plugins).

Besides its registered names, a registry may resolve a family of names ``PREFIX:REST`` through a function
(``resolve_prefix``): the datasets ``folder:PATH`` and ``npz:PATH`` are found this way (raydistill.userdata).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Dict, Generic, Iterator, TypeVar

from .errors import UsageError

T = TypeVar("T")
BUILT_IN = "built-in"
PLUGGABLE = ("method", "model", "dataset")  # the kinds a plugin may add (raydistill.extend)
PLUGIN_HINT = " (a plugin's? load it with --plugin MODULE_OR_FILE.py: docs/extending.md)"
_origin: list[Any] = [BUILT_IN]  # the origin of entries added now (a stack: the plugin being imported on top)
_all: list = []  # every Registry


class Collision(ValueError):
    """A name registered twice; ``existing`` is the origin of the entry that holds it."""

    def __init__(self, kind: str, name: str, existing: Any):
        super().__init__(f"{kind} '{name}' registered twice (it is already {describe(existing)})")
        self.kind, self.name, self.existing = kind, name, existing


class Unclaimed:
    """The origin of an entry that code outside raydistill added while no plugin was being loaded: a module that
    was imported another way (e.g. by unpickling, on a Ray worker) before the plugin loader claims it."""

    def __init__(self, module: str):
        self.module = self.label = module

    @property
    def name(self) -> str:
        return self.module

    def describe(self) -> str:
        return f"registered by module {self.module} (not loaded as a plugin)"

    def record(self) -> dict[str, Any]:
        """What a run records of it: the module and the digest of its file (when it has one)."""
        from .codedigest import digest

        path = getattr(sys.modules.get(self.module), "__file__", None)
        return {"kind": "module", "source": self.module, "digest": digest([path]) if path else "unknown",
                "version": None, "provides": {}}


# the registration helpers between a registry and the code that registers (skipped to find that code)
HELPERS = {("raydistill.models", "register_model"), ("raydistill.dataspec", "deco")}


def _caller() -> Any:
    """The origin of an entry added now: the plugin being loaded, else BUILT_IN for raydistill's own code, else
    the module outside raydistill that added it (Unclaimed)."""
    if _origin[-1] is not BUILT_IN:
        return _origin[-1]
    frame = sys._getframe(1)
    while frame is not None and (frame.f_globals.get("__name__") == __name__
                                 or (frame.f_globals.get("__name__"), frame.f_code.co_name) in HELPERS):
        frame = frame.f_back
    name = frame.f_globals.get("__name__", "") if frame is not None else ""
    return BUILT_IN if name == "raydistill" or name.startswith("raydistill.") else Unclaimed(name)


def claim(module: str, origin: Any) -> None:
    """Give ``origin`` the entries that module ``module`` (or a module of its package) added unclaimed."""
    for reg in _all:
        for name, o in reg._origins.items():
            if isinstance(o, Unclaimed) and (o.module == module or o.module.startswith(module + ".")):
                reg._origins[name] = origin


def describe(origin: Any) -> str:
    """``built-in``, or the plugin's one-line description (``plugin: /path/mart.py (sha256 ab12...)``)."""
    return origin if isinstance(origin, str) else origin.describe()


@contextlib.contextmanager
def registering_as(origin: Any) -> Iterator[None]:
    """Entries added inside this block have ``origin``."""
    _origin.append(origin)
    try:
        yield
    finally:
        _origin.pop()


_BEFORE_LOOKUP: list[Callable[[], None]] = []  # run before every lookup: raydistill.plugins adds its loader


def before_lookup(fn: Callable[[], None]) -> None:
    """Run ``fn`` before each lookup of any registry (raydistill.plugins: load the plugins of this process's
    environment, once; the registries know nothing of plugins beyond this hook)."""
    if fn not in _BEFORE_LOOKUP:
        _BEFORE_LOOKUP.append(fn)


def _ready() -> None:
    for fn in _BEFORE_LOOKUP:
        fn()


class Registry(Generic[T]):
    """A small name registry whose lookup failures are user-facing one-line errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._origins: Dict[str, Any] = {}
        self._prefixes: Dict[str, tuple[str, Callable[[str], T]]] = {}  # prefix -> (how it is written, resolver)
        _all.append(self)

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise Collision(self.kind, name, self._origins[name])
            self._items[name] = obj
            self._origins[name] = _caller()
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def remove(self, name: str) -> None:
        """Forget ``name`` (a plugin whose loading failed takes its entries back)."""
        self._items.pop(name, None)
        self._origins.pop(name, None)

    def origin(self, name: str) -> Any:
        """``BUILT_IN`` or the plugin that registered ``name`` (a resolved family's names: BUILT_IN)."""
        self.get(name)
        return self._origins.get(name, BUILT_IN)

    def resolve_prefix(self, prefix: str, written: str, resolve: Callable[[str], T]) -> None:
        """Names ``prefix:REST`` are ``resolve(name)`` (which raises UsageError for a bad one); ``written``
        is how the family appears in the list of choices, e.g. ``folder:PATH``."""
        self._prefixes[prefix] = (written, resolve)

    def _family(self, name: Any) -> Callable[[str], T] | None:
        prefix, sep, _ = name.partition(":") if isinstance(name, str) else ("", "", "")
        return self._prefixes[prefix][1] if sep and prefix in self._prefixes else None

    def added_by(self, origin: Any) -> list[str]:
        """The names ``origin`` registered (no plugin loading: for the loader itself)."""
        return [n for n, o in self._origins.items() if o is origin]

    def get(self, name: str) -> T:
        _ready()
        if name not in self._items and self._family(name) is not None:
            return self._family(name)(name)
        try:
            return self._items[name]
        except KeyError:
            hint = PLUGIN_HINT if self.kind in PLUGGABLE else ""
            choices = self.names() + [w for w, _ in self._prefixes.values()]
            raise UsageError(f"unknown {self.kind} '{name}'; choose from: {', '.join(choices)}{hint}") from None

    def names(self) -> list[str]:
        _ready()
        return list(self._items)

    def __contains__(self, name: Any) -> bool:
        """A registered name, or one of a resolved family (its form only: ``get`` checks what it names)."""
        _ready()
        return name in self._items or self._family(name) is not None

    def __iter__(self):
        _ready()
        return iter(self._items)
