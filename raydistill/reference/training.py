"""The training setting each published row came from (``training.yaml``, shipped beside ``published.yaml``):
what its paper states (epochs, learning rate and its decays, weight decay, hyperparameters in raydistill's
names), the paper's sentences that state it, and how a run's setting differs from it.

    from raydistill import reference
    row = reference.published("ard", "cifar10", "resnet18", paper="adaad")[0]
    row.training.text()     # '200 epochs, lr 0.1 x0.1 at 100,150, wd 0.0005, alpha 1'
    row.training.quote      # the paper's sentences (Sec. 4, Implementation Details)
    reference.differences(row, {"epochs": 200, "lr": 0.1, "lr_milestones": [100, 150], "weight_decay": 2e-4,
                                "alpha": 1.0, "tau": 30.0})   # {'weight_decay': (0.0002, 0.0005)}

A row's setting is its entry's values and the row's own ``setting.hparams`` (AT-AKA's amalgamation and
number of teachers). Where the paper gives no numbers for a row (``stated`` false: "we trained the
baselines following their original settings"), only the row's own hparams are compared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

SCHEDULE = ("epochs", "lr", "lr_milestones", "weight_decay")
_KEYS = ("paper", "tables", "methods", "datasets", "students", *SCHEDULE, "hp", "stated", "quote", "where", "note")


@dataclass(frozen=True)
class Training:
    """One setting of one paper, and the rows it covers (``tables`` x ``methods``, optionally ``datasets`` and
    ``students``). ``values``: the schedule keys of SCHEDULE and hyperparameters the paper states."""

    paper: str
    tables: tuple[str, ...]
    methods: tuple[str, ...]
    datasets: tuple[str, ...] | None
    students: tuple[str, ...] | None
    values: Mapping[str, Any]
    stated: bool
    quote: tuple[str, ...]
    where: str
    note: str | None = None

    def covers(self, row) -> bool:
        s = row.setting
        return (row.paper.key == self.paper and row.table.number in self.tables and row.method in self.methods
                and (self.datasets is None or s.dataset in self.datasets)
                and (self.students is None or s.student in self.students))

    def text(self) -> str:
        """e.g. ``200 epochs, lr 0.1 x0.1 at 100,150, wd 0.0005, alpha 1``; ``not stated (Sec. 4.1)``."""
        if not self.stated:
            return f"setting not stated ({self.where})"
        return describe(self.values)


def describe(values: Mapping[str, Any]) -> str:
    """A setting in a few words: the schedule as the study's plan prints it, then the hyperparameters."""
    v = dict(values)
    parts = []
    if "epochs" in v:
        parts.append(f"{v.pop('epochs')} epochs")
    lr, mil = v.pop("lr", None), v.pop("lr_milestones", None)
    if lr is not None or mil is not None:
        parts.append("lr" + (f" {_fmt(lr)}" if lr is not None else "") + (f" x0.1 at {_fmt(mil)}" if mil else ""))
    if "weight_decay" in v:
        parts.append(f"wd {_fmt(v.pop('weight_decay'))}")
    parts += [f"{k} {_fmt(x)}" for k, x in v.items()]
    return ", ".join(parts)


def _fmt(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return ",".join(map(_fmt, x))
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)


def load(raw: list, check, papers: Mapping, names: Mapping[str, tuple]) -> tuple[Training, ...]:
    """The entries of ``training.yaml``'s ``settings``, checked (``check(cond, where, what)`` raises)."""
    out = []
    for i, e in enumerate(raw):
        where = f"settings[{i}]"
        check(isinstance(e, dict) and not set(e) - set(_KEYS), where, f"unknown keys {sorted(set(e) - set(_KEYS))}")
        check(e.get("paper") in papers, where, f"unknown paper {e.get('paper')!r}")
        for key, known in (("methods", names["methods"]), ("datasets", names["datasets"]),
                           ("students", names["students"])):
            check(set(e.get(key) or ()) <= set(known), where, f"unknown {key} in {e.get(key)}")
        check(bool(e.get("tables")) and bool(e.get("methods")), where, "no tables or no methods")
        stated = bool(e.get("stated", True))
        values = {k: e[k] for k in SCHEDULE if k in e}
        values.update(e.get("hp") or {})
        check(stated == bool(values), where, "stated: false with values, or values missing")
        quote = tuple(" ".join(str(q).split()) for q in e.get("quote") or ())
        check(bool(quote) and bool(e.get("where")), where, "no quote or no where")
        out.append(Training(paper=e["paper"], tables=tuple(str(t) for t in e["tables"]), methods=tuple(e["methods"]),
                            datasets=tuple(e["datasets"]) if e.get("datasets") else None,
                            students=tuple(e["students"]) if e.get("students") else None,
                            values=values, stated=stated, quote=quote, where=" ".join(str(e["where"]).split()),
                            note=e.get("note")))
    return tuple(out)


def expected(row) -> dict[str, Any]:
    """What the row's setting fixes: its entry's values (when stated) and the row's own hparams."""
    t = row.training
    return {**(dict(t.values) if t is not None and t.stated else {}), **row.setting.hparams}


def setting_text(row) -> str:
    """The row's setting in a few words: its entry's (or 'setting not stated (WHERE)') and the row's hparams."""
    t = row.training
    own = describe(row.setting.hparams) if row.setting.hparams else ""
    base = "setting not recorded" if t is None else t.text()
    return f"{base}; {own}" if own else base


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return str(a) == str(b)


def differences(row, ours: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Name -> (ours, the row's) for each value the row's setting fixes that ``ours`` (a run's epochs, lr,
    lr_milestones, weight_decay and hyperparameters) does not share; a value ours lacks differs (None)."""
    return {k: (ours.get(k), v) for k, v in expected(row).items() if not _same(ours.get(k), v)}
