"""Reading a study file: YAML with line numbers and no duplicate keys, and the typed getters whose every
failure is ONE line, ``STUDY.yaml: <key path>: <what is wrong>; accepted: <what is>``.

A :class:`Where` is a position in the file (its name and a key path such as ``methods.peeraid.set``);
its getters take a value out of a mapping, check its type and range, and raise a UsageError that names
the file, the key and what is accepted.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

import yaml

from .. import cli
from ..errors import UsageError


class Where:
    """A key path inside a study file, for errors: ``Where("s.yaml").sub("search").sub("budget")``."""

    def __init__(self, file: str, path: str = ""):
        self.file, self.path = file, path

    def sub(self, key: Any) -> "Where":
        if isinstance(key, int):
            return Where(self.file, f"{self.path}[{key}]")
        return Where(self.file, f"{self.path}.{key}" if self.path else str(key))

    def fail(self, what: str, accepted: str | None = None) -> NoReturn:
        where = self.path or "<top level>"
        raise UsageError(f"{self.file}: {where}: {what}" + (f"; accepted: {accepted}" if accepted else ""))

    def wrap(self, exc: UsageError) -> NoReturn:
        """Re-raise a UsageError of the configuration (``--set tau=-1: ...``) at this key."""
        self.fail(" ".join(str(exc).split()))

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

    def names(self, value: Any, choices: Iterable[str], what: str) -> list[str]:
        """A non-empty list of distinct names, each one of ``choices``."""
        choices = list(choices)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            self.fail(f"expected a non-empty list of {what}, got {describe(value)}", ", ".join(choices))
        for i, v in enumerate(value):
            if not isinstance(v, str) or v not in choices:
                self.sub(i).fail(f"unknown {what[:-1] if what.endswith('s') else what} {describe(v)}", ", ".join(choices))
        dup = [v for i, v in enumerate(value) if v in value[:i]]
        if dup:
            self.fail(f"'{dup[0]}' is listed twice", f"each {what[:-1]} once")
        return list(value)


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
        where.fail(str(exc))
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
        doc = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
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
