"""Plugins: a user's own methods, models and datasets, registered where the built-ins are (raydistill.extend).

A plugin is Python code found in one of two ways:

* an installed package's entry points, groups ``raydistill.methods``, ``raydistill.models``,
  ``raydistill.datasets`` (:data:`GROUPS`): the object may be the thing itself (a Method subclass, a model
  factory, a dataset loader decorated with ``register_dataset``, a ``DatasetSpec``) or a module;
* ``--plugin MODULE_OR_FILE.py`` (every command), ``plugins:`` in a study file and ``RAYDISTILL_PLUGINS``
  (os.pathsep- or comma-separated): a ``.py`` file or an importable module.

Each is imported once. Inside it, every ``Method`` subclass with a ``name`` is registered (as the built-ins
of ``raydistill/methods/`` are); models and datasets register themselves at import through
``raydistill.extend``. Every entry it adds has the plugin as its origin (``registry``), and the plugin is
checked at once (raydistill.plugin_checks): a bad plugin is one ``error:`` line naming it, and takes its
entries back. Installed packages and ``RAYDISTILL_PLUGINS`` are loaded before the first registry lookup of
any process, Ray's workers included; the driver ships file and local-module plugins to every worker of
every node (raydistill.plugin_ray) with ``RAYDISTILL_PLUGINS`` naming them there.

Each plugin has a digest of its source (sha256 of the file, or of the package's Python and YAML files) and,
for a package, its version: every run records them (raydistill.provenance).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import site
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

from . import registry
from .origins import registries
from .errors import UsageError

GROUPS = {"raydistill.methods": "method", "raydistill.models": "model", "raydistill.datasets": "dataset"}
ENV = "RAYDISTILL_PLUGINS"
SOURCES_ENV = "RAYDISTILL_PLUGIN_SOURCES"  # set for Ray's workers: module -> {kind, source} as the driver saw it


@dataclass(eq=False)
class Plugin:
    """One loaded plugin. ``name``: its key in records and MLflow tags (a file's or module's name, a package's
    distribution name); ``kind``: file | module | package; ``source``: the file's path, the module's name, or
    ``dist==version (entry point group:name, ...)``; ``label``: how messages name it (as it was given);
    ``ship``: the file or folder the driver ships to Ray's workers (None: installed, every node needs it)."""

    name: str
    kind: str
    source: str
    label: str
    digest: str = ""
    version: str | None = None
    module: str = ""
    ship: str | None = None
    roots: list = field(default_factory=list)  # files / folders of its code (digest; where its errors point)
    shipped: bool = False  # a Ray worker's copy, shipped by the driver (its files beside the code stayed there)

    def describe(self) -> str:
        return f"plugin: {self.source} (sha256 {self.digest.split(':', 1)[-1][:12]})"

    def modules(self) -> list[str]:
        """The top-level modules of its code (a file's module, a package's folders' names)."""
        return list(dict.fromkeys([self.module.split(".")[0]] if self.module else [Path(r).stem for r in self.roots]))

    def provides(self) -> dict[str, list[str]]:
        """Kind -> the names this plugin registered (``{"method": ["mart"]}``)."""
        out = {kind: reg.added_by(self) for kind, reg in registries().items()}
        return {k: v for k, v in out.items() if v}

    def record(self) -> dict[str, Any]:
        """What a run records of it (summary JSON, checkpoint meta, the resume checks)."""
        return {"kind": self.kind, "source": self.source, "digest": self.digest, "version": self.version,
                "provides": self.provides()}


LOADED: dict[str, Plugin] = {}  # key (file path, module name, distribution) -> plugin
_state = {"entry_points": False, "env": None, "busy": False}


# ----------------------------------------------------------------------------- loading
def load_environment() -> None:
    """Load installed packages' entry points (once) and what ``RAYDISTILL_PLUGINS`` names (again when it changes)."""
    env = os.environ.get(ENV, "")
    if _state["busy"] or (_state["entry_points"] and env == _state["env"]):
        return
    _state["busy"] = True
    try:
        _builtins()
        if not _state["entry_points"]:
            _state["entry_points"] = True
            _load_entry_points()
        if env != _state["env"]:
            _state["env"] = env
            for spec in split(env):
                load(spec, given=f"{spec} (from {ENV})")
    finally:
        _state["busy"] = False


def use(specs: Iterable[str] | None, base: str | os.PathLike | None = None, where: str = "--plugin") -> list[Plugin]:
    """Load the plugins a command line (``--plugin``) or a study file (``plugins:``, paths relative to ``base``)
    names, after the environment's; returns them. Raises UsageError (one line) for a bad one."""
    load_environment()
    out = []
    for spec in specs or []:
        if not isinstance(spec, str) or not spec.strip():
            raise UsageError(f"{where} {spec!r}: give a module name or a .py file")
        out.append(load(spec.strip(), base=base))
    return out


def split(text: str) -> list[str]:
    """``RAYDISTILL_PLUGINS``'s entries: separated by os.pathsep or commas."""
    return [t.strip() for part in text.split(os.pathsep) for t in part.split(",") if t.strip()]


def _builtins() -> None:
    """Every built-in registry filled first: entries added while a plugin is imported are the plugin's."""
    for module in ("data", "evaluation", "methods", "models"):
        importlib.import_module(f"{__package__}.{module}")


def is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or "/" in spec


def load(spec: str, base: str | os.PathLike | None = None, given: str | None = None) -> Plugin:
    """Load one plugin: a ``.py`` file (relative to ``base``, default the working folder) or a module name."""
    sources = json.loads(os.environ.get(SOURCES_ENV) or "{}")  # on a Ray worker: how the driver named it
    if is_file_spec(spec):
        path = Path(base or ".").joinpath(os.path.expanduser(spec)).resolve()
        if str(path) in LOADED:
            return LOADED[str(path)]
        if not path.is_file():
            raise UsageError(f"plugin {given or spec}: file '{path}' does not exist; give a .py file or a module name")
        if path.suffix != ".py":
            raise UsageError(f"plugin {given or spec}: '{path.name}' is not a .py file; give a .py file or a module name")
        module = path.stem
        if not module.isidentifier():
            raise UsageError(f"plugin {given or spec}: '{path.name}' is not a Python module name (letters, digits, _); rename it")
        other = next((p for p in LOADED.values() if p.module == module), None)
        if other is not None:
            raise UsageError(f"plugin {given or spec}: its module name '{module}' is also that of {other.label}; rename one")
        found = _find(module)
        if found is not None and Path(found).resolve() != path:
            raise UsageError(f"plugin {given or spec}: its name '{module}' is that of the module {found}; rename the file")
        plugin = Plugin(module, "file", _where(path), given or spec, module=module, ship=str(path), roots=[path])
        return _load(str(path), plugin, lambda: _import_file(module, path))
    if spec in LOADED:
        return LOADED[spec]
    top = spec.split(".")[0]
    where = _find(top)
    if where is None:
        raise UsageError(f"plugin {given or spec}: no module named '{top}' (not a file either: a file's name ends in .py)")
    root = Path(where)
    root = root.parent if root.name == "__init__.py" else root
    seen = sources.get(spec, {})
    plugin = Plugin(spec, seen.get("kind", "module"), seen.get("source", f"module {spec} at {root}"),
                    given or f"module {spec}", module=spec, ship=None if _installed(root) else str(root), roots=[root],
                    shipped=bool(seen))
    if plugin.ship is None:  # an installed module: its distribution's version
        dist = _distribution_of(top)
        plugin.version = dist[1] if dist else None
        plugin.source = f"{plugin.source} ({dist[0]}=={dist[1]})" if dist and not seen else plugin.source
    return _load(spec, plugin, lambda: importlib.import_module(spec))


def _where(path: Path) -> str:
    """A file plugin's source as records show it: its path, or inside a submitted job its path in the job's
    --working-dir (the job runs in Ray's temporary copy of it)."""
    cwd = Path.cwd()
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and "working_dir_files" in cwd.parts[-2:-1] and path.is_relative_to(cwd):
        return f"{path.relative_to(cwd)} (in the submitted job's --working-dir)"
    return str(path)


def _find(module: str) -> str | None:
    """Where ``module`` (a top-level name) would be imported from, without importing it; None when nowhere."""
    if module in sys.modules:
        return getattr(sys.modules[module], "__file__", None) or "(built in)"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    return spec.origin if spec.origin not in (None, "namespace") else next(iter(spec.submodule_search_locations or []), None)


def _installed(path: Path) -> bool:
    """Whether ``path`` lies in an installation folder (site-packages): then it is not shipped, every node needs it."""
    dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")} | set(site.getsitepackages())
    dirs.add(site.getusersitepackages())
    path = path.resolve()
    return any(path.is_relative_to(Path(d).resolve()) for d in dirs if d)


def _distribution_of(module: str) -> tuple[str, str] | None:
    """(name, version) of the installed distribution that holds top-level module ``module``, if any."""
    for name in importlib.metadata.packages_distributions().get(module) or []:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _import_file(module: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod  # importable by name: Ray pickles its classes by reference (workers import it)
    spec.loader.exec_module(mod)
    return mod


def _load(key: str, plugin: Plugin, do_import) -> Plugin:
    """Import ``plugin`` with ``do_import`` (its entries registered as its own), register its methods, check it."""
    from . import plugin_checks
    from .codedigest import digest

    plugin.digest = plugin.digest or digest(plugin.roots)
    try:
        with registry.registering_as(plugin):
            module = do_import()
            for name in plugin.modules():  # what it registered before (imported another way, e.g. unpickled)
                registry.claim(name, plugin)
            if isinstance(module, ModuleType):
                register_methods(module)
        if not plugin.provides():
            raise UsageError(f"plugin {plugin.label} registers no method, model or dataset: define a Method subclass "
                             "with a name, or call raydistill.extend's register_model / register_dataset (docs/extending.md)")
        plugin_checks.check_plugin(plugin)
    except registry.Collision as exc:
        _unload(plugin)
        what = "a built-in" if exc.existing == registry.BUILT_IN else f"from {exc.existing.label}"
        raise UsageError(f"plugin {plugin.label}: {exc.kind} '{exc.name}' is already {what}; give yours another "
                         "name") from None
    except UsageError:
        _unload(plugin)
        raise
    except BaseException as exc:  # the plugin's own error, in one line with where it happened
        _unload(plugin)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UsageError(f"plugin {plugin.label} failed to import: {plugin_checks.error_line(exc, plugin.roots)}") from None
    LOADED[key] = plugin
    return plugin


def _unload(plugin: Plugin) -> None:
    from .models import INPUT_SIZES

    for kind, reg in registries().items():
        for name in reg.added_by(plugin):
            reg.remove(name)
            if kind == "model":
                INPUT_SIZES.pop(name, None)
    if plugin.kind == "file":
        sys.modules.pop(plugin.module, None)


def register_methods(module: ModuleType) -> None:
    """Register every Method subclass with a name that ``module`` (or a module of its package) defines."""
    from .methods import METHODS
    from .methods.base import Method

    known = set(METHODS._items.values())
    for _, obj in inspect.getmembers(module, inspect.isclass):
        home = obj.__module__ or ""
        if (issubclass(obj, Method) and obj.name and obj not in known
                and (home == module.__name__ or home.startswith(module.__name__ + "."))):
            METHODS.add(obj.name, obj)
            known.add(obj)


# ----------------------------------------------------------------------------- entry points
def _load_entry_points() -> None:
    """Every installed package's entry points in GROUPS, one plugin per distribution."""
    by_dist: dict[str, list] = {}
    every = importlib.metadata.entry_points()  # one scan of the installed distributions
    for group in GROUPS:
        for ep in every.select(group=group):
            dist = getattr(ep, "dist", None)
            by_dist.setdefault(dist.name if dist is not None else ep.module.split(".")[0], []).append(ep)
    for dist_name, eps in sorted(by_dist.items()):
        dist = getattr(eps[0], "dist", None)
        version = dist.version if dist is not None else None
        points = ", ".join(f"{ep.group}:{ep.name}" for ep in eps)
        label = f"{dist_name}=={version}" if version else dist_name
        roots = []
        for ep in eps:
            found = _find(ep.module.split(".")[0])
            if found and found != "(built in)":
                root = Path(found)
                roots.append(root.parent if root.name == "__init__.py" else root)
        plugin = Plugin(dist_name, "package", f"{label} (entry point{'s' if len(eps) > 1 else ''} {points})",
                        f"{label} (entry point {points})", version=version, roots=list(dict.fromkeys(roots)))
        _load(f"dist:{dist_name}", plugin, lambda eps=eps: [_entry_point(ep) for ep in eps])


def _entry_point(ep) -> None:
    """Load one entry point and register what it names (a module registers itself, or its methods are found)."""
    from .data import DATASETS, DatasetSpec
    from .methods import METHODS
    from .methods.base import Method
    from .models import MODELS, register_model

    obj = ep.load()
    kind = GROUPS[ep.group]
    where = f"entry point {ep.group}:{ep.name} ({ep.value})"
    if isinstance(obj, ModuleType):
        register_methods(obj)
    elif kind == "method":
        if not (inspect.isclass(obj) and issubclass(obj, Method) and obj.name):
            raise UsageError(f"{where} is neither a Method subclass with a name nor a module")
        if obj not in METHODS._items.values():
            METHODS.add(obj.name, obj)
    elif kind == "model":
        if not callable(obj):
            raise UsageError(f"{where} is neither a model factory (num_classes, in_channels) -> nn.Module nor a module")
        if obj not in MODELS._items.values():
            register_model(ep.name, obj, input_sizes=getattr(obj, "input_sizes", None))
    elif isinstance(obj, DatasetSpec):
        if obj not in DATASETS._items.values():
            DATASETS.add(ep.name, obj)
    elif not any(s.loader is obj for s in DATASETS._items.values()):
        raise UsageError(f"{where} is not registered: decorate the loader with raydistill.extend.register_dataset(name, "
                         "num_classes, in_shape), or point the entry point at a DatasetSpec or a module")


# ----------------------------------------------------------------------------- lookups
# ----------------------------------------------------------------------------- the command line
PLUGIN_HELP = ("load a plugin: a .py file or a module holding methods, models or datasets (repeatable; also "
               f"{ENV}, and installed packages' entry points); docs/extending.md")


def add_option(parser) -> None:
    """``--plugin MODULE_OR_FILE.py`` (repeatable), on every command."""
    parser.add_argument("--plugin", action="append", metavar="MODULE_OR_FILE.py", help=PLUGIN_HELP)


def listing(kind: str = "method") -> list[str]:
    """One line per registered name: the name, then its origin (``built-in`` or the plugin and where it came from)."""
    reg = registries()[kind]
    names = reg.names()
    width = max((len(n) for n in names), default=0)
    return [f"{n:<{width}}  {registry.describe(reg.origin(n))}" for n in names]


registry.before_lookup(load_environment)  # a process's first lookup of any registry loads them
