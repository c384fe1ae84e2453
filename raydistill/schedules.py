"""Hyperparameter schedules any coefficient can use (the warm-up schedules the search tunes).

Forms accepted everywhere (``--set``, presets, search spaces):

* a number                      constant
* ``linear(a, b, e0, e1)``      a until epoch e0, linear ramp to b at epoch e1, b afterwards
* ``step(a, b, e)``             a before epoch e, b from epoch e on
* the dict forms ``{"kind": "linear", "start": a, "end": b, "from": e0, "to": e1}`` and
  ``{"kind": "step", "before": a, "after": b, "at": e}``

Epochs are fractional (epoch + batch/num_batches) so ramps are smooth within an epoch.
Strings are parsed with a regular expression, never evaluated.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_CALL = re.compile(rf"^\s*(linear|step)\s*\(\s*({_NUM}(?:\s*,\s*{_NUM})*)\s*\)\s*$")


@dataclass(frozen=True)
class Schedule:
    kind: str  # "linear" | "step"
    a: float
    b: float
    e0: float
    e1: float

    def __call__(self, epoch: float) -> float:
        if self.kind == "step":
            return self.a if epoch < self.e0 else self.b
        if epoch <= self.e0:
            return self.a
        if epoch >= self.e1:
            return self.b
        return self.a + (self.b - self.a) * (epoch - self.e0) / (self.e1 - self.e0)

    def to_dict(self) -> dict:
        if self.kind == "step":
            return {"kind": "step", "before": self.a, "after": self.b, "at": self.e0}
        return {"kind": "linear", "start": self.a, "end": self.b, "from": self.e0, "to": self.e1}

    def __str__(self) -> str:
        if self.kind == "step":
            return f"step({self.a:g},{self.b:g},{self.e0:g})"
        return f"linear({self.a:g},{self.b:g},{self.e0:g},{self.e1:g})"


def parse_schedule(value: Any, name: str = "value") -> float | Schedule:
    """Turn a number, schedule string or schedule dict into a float or a Schedule."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool):
        raise UsageError(f"{name}={value!r} is not a number or schedule; give e.g. 0.5, linear(0,1,0,10) or step(1,0.1,40)")
    if isinstance(value, (int, float)):
        if not math.isfinite(float(value)):
            raise UsageError(f"{name}={value!r} is not finite; give a finite number or a schedule")
        return float(value)
    if isinstance(value, dict):
        kind = value.get("kind")
        try:
            if kind == "linear":
                return _make("linear", float(value["start"]), float(value["end"]), float(value["from"]), float(value["to"]), name)
            if kind == "step":
                return _make("step", float(value["before"]), float(value["after"]), float(value["at"]), float(value["at"]), name)
        except (KeyError, TypeError, ValueError):
            pass
        raise UsageError(f"{name}: schedule {value!r} is malformed; expected {{kind: linear, start, end, from, to}} or {{kind: step, before, after, at}}")
    if isinstance(value, str):
        text = value.strip()
        try:
            return parse_schedule(float(text), name)
        except ValueError:
            pass
        m = _CALL.match(text)
        if m:
            args = [float(t) for t in m.group(2).split(",")]
            if m.group(1) == "linear" and len(args) == 4:
                return _make("linear", *args, name=name)
            if m.group(1) == "step" and len(args) == 3:
                return _make("step", args[0], args[1], args[2], args[2], name)
    raise UsageError(f"{name}={value!r} is not a number or schedule; give e.g. 0.5, linear(0,1,0,10) or step(1,0.1,40)")


def _make(kind: str, a: float, b: float, e0: float, e1: float, name: str) -> Schedule:
    if e0 < 0 or e1 < e0 or (kind == "linear" and e1 == e0):
        raise UsageError(f"{name}: schedule epochs must satisfy 0 <= from < to (got {e0:g}, {e1:g})")
    return Schedule(kind, a, b, e0, e1)


def value_at(value: float | Schedule, epoch: float) -> float:
    return value(epoch) if isinstance(value, Schedule) else value


def resolve_fractions(value: Any, epochs: int) -> Any:
    """Schedules and epoch counts from a search are fractions of the run's epochs; make them epochs."""
    if isinstance(value, dict) and "epochs_frac" in value:
        return int(round(value["epochs_frac"] * epochs))
    if isinstance(value, dict) and "at_frac" in value:
        return {"kind": "step", "before": value["before"], "after": value["after"], "at": value["at_frac"] * epochs}
    if isinstance(value, dict) and "from_frac" in value:
        return {"kind": "linear", "start": value["start"], "end": value["end"],
                "from": value["from_frac"] * epochs, "to": value["to_frac"] * epochs}
    return value


def lr_at(cfg, epoch: int) -> float:
    """The learning rate of a run (a TrainConfig) at ``epoch``: piecewise-constant decay, lr * gamma^(number of
    milestones <= epoch)."""
    return cfg.lr * cfg.lr_gamma ** sum(1 for m in cfg.lr_milestones if epoch >= m)
