"""Reading a study file: YAML with line numbers and no duplicate keys, and the typed getters whose every
failure is ONE line, ``STUDY.yaml: <key path>: <what is wrong>; accepted: <what is>``.

A :class:`Where` is a position in the file (its name and a key path such as ``methods.peeraid.set``);
its getters take a value out of a mapping, check its type and range, and raise a UsageError that names
the file, the key and what is accepted.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

import yaml

from .. import cli
from ..errors import UsageError


class Where:
    """A key path inside a study file, for errors: ``Where("s.yaml").sub("search").sub("budget")``.

    Names of registered things (methods, datasets, architectures, attacks) are checked in a second pass,
    :meth:`check_names`, so that a file's shape and types are checked without importing PyTorch.
    """

    KINDS = ("method", "dataset", "model", "attack")

    def __init__(self, file: str, path: str = "", pending: list | None = None):
        self.file, self.path = file, path
        self.pending = [] if pending is None else pending  # (where, name, kind), shared by every sub-path

    def sub(self, key: Any) -> "Where":
        if isinstance(key, int):
            return Where(self.file, f"{self.path}[{key}]", self.pending)
        return Where(self.file, f"{self.path}.{key}" if self.path else str(key), self.pending)

    def fail(self, what: str, accepted: str | None = None) -> NoReturn:
        where = self.path or "<top level>"
        raise UsageError(f"{self.file}: {where}: {what}" + (f"; accepted: {accepted}" if accepted else ""))

    def wrap(self, exc: UsageError) -> NoReturn:
        """Re-raise a UsageError of the configuration (``--set tau=-1: ...``) at this key."""
        self.fail(" ".join(str(exc).split()))

    # ---- names (checked by check_names)
    def name(self, value: Any, kind: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{describe(value)} is not a {kind} name", f"the name of a {kind}")
        self.pending.append((self, value, kind))
        return value

    def names(self, value: Any, kind: str) -> list[str]:
        """A non-empty list of distinct names of ``kind`` (one name alone is a list of one)."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            self.fail(f"expected a non-empty list of {kind}s, got {describe(value)}", f"a list of {kind} names")
        out = [self.sub(i).name(v, kind) for i, v in enumerate(value)]
        dup = [v for i, v in enumerate(out) if v in out[:i]]
        if dup:
            self.fail(f"'{dup[0]}' is listed twice", f"each {kind} once")
        return out

    def check_names(self) -> None:
        """Every name met so far against its registry (this imports the methods, models: PyTorch)."""
        from ..data import DATASETS
        from ..evaluation import ATTACKS
        from ..methods import METHODS
        from ..models import MODELS

        known = {"method": METHODS, "dataset": DATASETS, "model": MODELS, "attack": ATTACKS}
        for where, value, kind in self.pending:
            if kind == "dataset" and value in DATASETS:  # folder:PATH, npz:PATH too: their data is read here
                try:
                    DATASETS.get(value)
                except UsageError as exc:
                    where.wrap(exc)
            elif value not in known[kind]:
                where.fail(f"unknown {kind} {describe(value)}", ", ".join(known[kind].names()))

    # ---- mappings
    def mapping(self, value: Any, keys: Iterable[str], what: str = "a mapping") -> dict:
        """``value`` as a mapping whose keys are all among ``keys`` (None: an empty mapping)."""
        keys = list(keys)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(f"expected {what}, got {describe(value)}", "a mapping of " + ", ".join(keys))
        for k in value:
            if k not in keys:
                self.sub(k).fail("unknown key", ", ".join(keys))
        return value

    def required(self, d: dict, key: str, accepted: str) -> Any:
        if d.get(key) is None:
            self.sub(key).fail("missing", accepted)
        return d[key]

    # ---- scalars (each reads d[key] at self.sub(key); ``default`` when it is absent)
    def integer(self, d: dict, key: str, default: Any = None, low: int = 0) -> Any:
        v = d.get(key, default)
        if v is default:
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            self.sub(key).fail(f"{describe(v)} is not an integer >= {low}", f"an integer >= {low}")
        return v

    def number(self, d: dict, key: str, default: Any = None, positive: bool = False) -> Any:
        """A finite number >= 0 (> 0 with ``positive``); text such as ``8/255`` is accepted."""
        v = d.get(key, default)
        if v is default:
            return v
        ok = f"a number {'>' if positive else '>='} 0 (fractions such as 8/255 allowed)"
        if isinstance(v, bool):
            self.sub(key).fail(f"{describe(v)} is not a number", ok)
        try:
            out = float(v) if isinstance(v, (int, float)) else cli.nonneg_float(str(v))
        except (argparse.ArgumentTypeError, TypeError):
            self.sub(key).fail(f"{describe(v)} is not a number", ok)
        if not math.isfinite(out) or out < 0 or (positive and out == 0):
            self.sub(key).fail(f"{v} is out of range", ok)
        return out

    def text(self, d: dict, key: str, default: Any = None) -> Any:
        v = d.get(key, default)
        if v is default:
            return v
        if not isinstance(v, str) or not v.strip():
            self.sub(key).fail(f"{describe(v)} is not a non-empty string", "text")
        return v.strip()

    def choice(self, d: dict, key: str, choices: Iterable[str], default: Any = None) -> Any:
        choices = list(choices)
        v = d.get(key, default)
        if v is default:
            return v
        if not isinstance(v, str) or v not in choices:
            self.sub(key).fail(f"unknown value {describe(v)}", ", ".join(choices))
        return v


def describe(v: Any) -> str:
    """A short rendering of a YAML value for an error line."""
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return "nothing" if v is None else str(v)


def option(where: Where, name: str, value: Any, parse: Callable, choices: tuple | None = None) -> Any:
    """A TrainConfig option's YAML value through its command-line parser (``parse`` of the option table)."""
    if parse is bool:
        if not isinstance(value, bool):
            where.fail(f"{describe(value)} is not true or false", "true, false")
        return value
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if isinstance(value, (dict, bool)) or value is None:
        where.fail(f"{describe(value)} is not a value for {name}", "a number or text")
    try:
        out = parse(str(value)) if parse is not None else str(value)
    except argparse.ArgumentTypeError as exc:
        m = re.fullmatch(r"must be (.*), got (.*)", str(exc))
        where.fail(f"{m.group(2)} is out of range", m.group(1)) if m else where.fail(str(exc))
    except UsageError as exc:
        where.wrap(exc)
    if choices and out not in choices:
        where.fail(f"unknown value {describe(out)}", ", ".join(choices))
    return out


# ----------------------------------------------------------------------------- the file
class _Loader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: Path, label: str) -> dict:
    """The study file's top-level mapping; a missing, unreadable, empty or malformed file is one line."""
    where = Where(label)
    if not path.exists():
        raise UsageError(f"{label}: the study file does not exist; accepted: a YAML file such as studies/quickstart.yaml")
    if path.is_dir():
        raise UsageError(f"{label}: is a folder; accepted: a YAML study file")
    try:
        loader = _Loader(path.read_text())  # a SafeLoader that refuses duplicate keys
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{label}: cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f"line {mark.line + 1}" if mark is not None else "<file>"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{label}: {line}: not valid YAML: {problem}; accepted: a YAML mapping "
                         f"(see docs/studies.md)") from None
    if doc is None:
        where.fail("the file is empty", "a YAML mapping with at least dataset, student, methods and search")
    if not isinstance(doc, dict):
        where.fail(f"expected a mapping, got {describe(doc)}", "a YAML mapping with at least dataset, student, "
                   "methods and search")
    return doc
