"""Search spaces: ``search_spaces/METHOD.yaml`` -> an Optuna define-by-run function.

File format (read with yaml.safe_load and validated on load)::

    method: peeraid                 # must match the method being tuned
    description: free text
    params:                         # hyperparameter name (as in the method's hparams) -> distribution
      gamma2: {float: [0.01, 10.0], log: true}
      tau:    {categorical: [1, 2, 5, 10]}
      n_teachers: {int: [2, 4]}
      warmup: {float: [0.0, 0.5], of_epochs: true}   # an epoch count, as a fraction of the run's epochs
      beta:   {float: [0.5, 4.0], when: {amalgamation: soft}}    # conditional parameter
      lambda3:                      # a warm-up schedule on a coefficient
        schedule:
          kind: [constant, linear, step]       # categorical over schedule kinds
          value: {float: [0.1, 5.0], log: true}  # the value reached after the warm-up
          start: 0.0                            # the value before the warm-up (number or distribution)
          from: {float: [0.0, 0.3]}             # warm-up start, as a fraction of the epochs
          to: {float: [0.3, 0.8]}               # warm-up end (linear), fraction of the epochs
    fixed:                          # hyperparameters pinned for every trial
      kl_reduction: mean

A distribution is ``{float: [low, high], log: bool, step: number}``, ``{int: [low, high], log: bool}``
or ``{categorical: [choices...]}``; a plain number/string is a constant. ``when`` makes a parameter
conditional on earlier ones (define-by-run: it is only sampled when the condition holds).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import TUNABLE_SETTINGS
from .errors import UsageError
from .schedules import resolve_fractions

SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
DIST_KEYS = {"float", "int", "categorical"}
SCHEDULE_KINDS = ("constant", "linear", "step")


def default_path(method: str) -> Path:
    """The YAML file the method declares (``Method.search_space``, a plugin's), else search_spaces/METHOD.yaml
    in the working folder or next to the package (source checkout)."""
    from .methods import get_method

    declared = declared_path(get_method(method))
    if declared is not None:
        return declared
    for base in (Path.cwd() / "search_spaces", SPACES_DIR):
        if (base / f"{method}.yaml").exists():
            return base / f"{method}.yaml"
    return SPACES_DIR / f"{method}.yaml"


def declared_path(cls) -> Path | None:
    """The search space method class ``cls`` declares (``search_space``: relative to its module's file), or None."""
    if not cls.search_space:
        return None
    module = sys.modules.get(cls.__module__)
    base = Path(module.__file__).parent if module is not None and getattr(module, "__file__", None) else Path.cwd()
    return (base / os.path.expanduser(cls.search_space)).resolve()


class SearchSpace:
    def __init__(self, path: Path, method: str, params: dict[str, Any], fixed: dict[str, Any]):
        self.path, self.method, self.params, self.fixed = path, method, params, fixed

    def sample(self, trial) -> dict[str, Any]:
        """Optuna define-by-run: suggest every (active) parameter; returns hyperparameter values."""
        out: dict[str, Any] = {}
        for name, spec in self.params.items():
            cond = spec.get("when") if isinstance(spec, dict) else None
            if cond and any(out.get(k) != v for k, v in cond.items()):
                continue
            if isinstance(spec, dict) and "schedule" in spec:
                out[name] = self._schedule(trial, name, spec["schedule"])
            else:
                out[name] = _suggest(trial, name, spec)
        return out

    @staticmethod
    def _schedule(trial, name: str, spec: dict) -> Any:
        kinds = spec.get("kind", ["constant"])
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        kind = trial.suggest_categorical(f"{name}.kind", kinds) if len(kinds) > 1 else kinds[0]
        value = _suggest(trial, f"{name}.value", spec["value"])
        if kind == "constant":
            return value
        start = _suggest(trial, f"{name}.start", spec.get("start", 0.0))
        frm = _suggest(trial, f"{name}.from", spec.get("from", 0.0))
        if kind == "step":
            return {"kind": "step", "before": start, "after": value, "at_frac": frm}
        to = _suggest(trial, f"{name}.to", spec.get("to", 0.5))
        return {"kind": "linear", "start": start, "end": value, "from_frac": frm, "to_frac": max(to, frm + 1e-3)}

    def hyperparameters(self) -> dict[str, Any]:
        """Fixed values, merged by the caller under the sampled ones."""
        return dict(self.fixed)


def _suggest(trial, name: str, spec: Any) -> Any:
    if not isinstance(spec, dict):
        return spec
    if spec.get("of_epochs"):
        lo, hi = spec["float"]
        return {"epochs_frac": trial.suggest_float(name, lo, hi)}
    if "float" in spec:
        lo, hi = spec["float"]
        return trial.suggest_float(name, lo, hi, log=bool(spec.get("log", False)), step=spec.get("step"))
    if "int" in spec:
        lo, hi = spec["int"]
        return trial.suggest_int(name, lo, hi, log=bool(spec.get("log", False)))
    return trial.suggest_categorical(name, list(spec["categorical"]))


# ----------------------------------------------------------------------------- loading + validation
def load(method: str, path: str | os.PathLike | None = None) -> SearchSpace:
    from .methods import get_method

    cls = get_method(method)
    p = Path(path) if path else default_path(method)
    if not p.exists():
        raise UsageError(f"search space '{p}' does not exist; give --search-space FILE, create search_spaces/{method}.yaml "
                         "or (a plugin's method) declare search_space = 'FILE.yaml' on its class")
    try:
        doc = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"search space '{p}' is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    bad = lambda key, why: UsageError(f"search space '{p}': {key}: {why}")  # noqa: E731
    if not isinstance(doc, dict):
        raise bad("<top level>", "expected a mapping with 'params'")
    unknown = set(doc) - {"method", "description", "params", "fixed"}
    if unknown:
        raise bad(sorted(unknown)[0], "unknown key; allowed: method, description, params, fixed")
    if doc.get("method", method) != method:
        raise bad("method", f"the file is for '{doc['method']}', not '{method}'")
    params, fixed = doc.get("params") or {}, doc.get("fixed") or {}
    if not isinstance(params, dict) or not params:
        raise bad("params", "expected a non-empty mapping of hyperparameter -> distribution")
    if not isinstance(fixed, dict):
        raise bad("fixed", "expected a mapping of hyperparameter -> value")
    known = {**TUNABLE_SETTINGS, **cls.hparams}
    seen: list[str] = []
    for name, spec in list(params.items()) + list(fixed.items()):
        if name not in known:
            raise bad(name, f"{method} has no hyperparameter '{name}'; it has: {', '.join(sorted(known))}")
    for name, spec in params.items():
        key = f"params.{name}"
        if isinstance(spec, dict) and "schedule" in spec:
            _check_schedule(spec, key, bad, known[name])
        else:
            _check_dist(spec, key, bad)
        if isinstance(spec, dict) and "when" in spec:
            cond = spec["when"]
            if not isinstance(cond, dict) or not cond:
                raise bad(f"{key}.when", "expected a mapping {earlier_param: value}")
            for k in cond:
                if k not in seen:
                    raise bad(f"{key}.when", f"'{k}' is not a parameter listed before '{name}'")
        seen.append(name)
    space = SearchSpace(p, method, params, fixed)
    _check_types(space, cls, p)
    return space


def _check_dist(spec: Any, key: str, bad: Callable) -> None:
    if not isinstance(spec, dict):
        if isinstance(spec, (int, float, str, bool)):
            return
        raise bad(key, f"expected a distribution or a constant, got {spec!r}")
    kinds = DIST_KEYS & set(spec)
    if len(kinds) != 1:
        raise bad(key, "expected exactly one of float: [low, high], int: [low, high], categorical: [...]")
    extra = set(spec) - DIST_KEYS - {"log", "step", "when", "of_epochs"}
    if extra:
        raise bad(f"{key}.{sorted(extra)[0]}", "unknown key; allowed: float/int/categorical, log, step, when, of_epochs")
    kind = kinds.pop()
    if spec.get("of_epochs") and not (kind == "float" and 0 <= spec["float"][0] <= spec["float"][1] <= 1):
        raise bad(f"{key}.of_epochs", "needs float: [low, high] within [0, 1] (fractions of the run's epochs)")
    val = spec[kind]
    if kind == "categorical":
        if not isinstance(val, list) or not val:
            raise bad(f"{key}.categorical", "expected a non-empty list of choices")
        return
    if not (isinstance(val, list) and len(val) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in val)):
        raise bad(f"{key}.{kind}", f"expected [low, high] numbers, got {val!r}")
    lo, hi = val
    if kind == "int" and not all(isinstance(v, int) for v in val):
        raise bad(f"{key}.int", f"expected integer bounds, got {val!r}")
    if lo > hi:
        raise bad(f"{key}.{kind}", f"low {lo} is above high {hi}")
    if spec.get("log") and lo <= 0:
        raise bad(f"{key}.log", f"a log scale needs low > 0, got {lo}")


def _check_schedule(spec: dict, key: str, bad: Callable, default: Any) -> None:
    sched = spec["schedule"]
    if not isinstance(default, float):
        raise bad(key, "only float hyperparameters can take a schedule")
    if not isinstance(sched, dict) or "value" not in sched:
        raise bad(f"{key}.schedule", "expected a mapping with at least 'value'")
    extra = set(sched) - {"kind", "value", "start", "from", "to"}
    if extra:
        raise bad(f"{key}.schedule.{sorted(extra)[0]}", "unknown key; allowed: kind, value, start, from, to")
    kinds = sched.get("kind", ["constant"])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if not isinstance(kinds, list) or not kinds or any(k not in SCHEDULE_KINDS for k in kinds):
        raise bad(f"{key}.schedule.kind", f"expected a list drawn from {', '.join(SCHEDULE_KINDS)}")
    for part in ("value", "start", "from", "to"):
        if part in sched:
            _check_dist(sched[part], f"{key}.schedule.{part}", bad)
    for part in ("from", "to"):
        v = sched.get(part)
        bounds = v.get("float") if isinstance(v, dict) else ([v, v] if isinstance(v, (int, float)) else None)
        if bounds is not None and not (0 <= bounds[0] <= bounds[1] <= 1):
            raise bad(f"{key}.schedule.{part}", "warm-up epochs are fractions of the run: stay within [0, 1]")


def _check_types(space: SearchSpace, cls, path: Path) -> None:
    """Type-check every value a trial could get: each categorical choice, both ends of each range,
    and a sample of each schedule."""
    import optuna

    from .config import coerce_value

    def check(name: str, value: Any) -> None:
        try:
            coerce_value(space.method, name, resolve_fractions(value, 100))
        except UsageError as exc:
            raise UsageError(f"search space '{path}': params.{name}: {exc}") from None

    for name, value in space.fixed.items():
        check(name, value)
    for name, spec in space.params.items():
        if isinstance(spec, dict) and "categorical" in spec:
            for choice in spec["categorical"]:
                check(name, choice)
        elif isinstance(spec, dict) and spec.get("of_epochs"):
            for bound in spec["float"]:
                check(name, resolve_fractions({"epochs_frac": bound}, 100))
        elif isinstance(spec, dict) and ("float" in spec or "int" in spec):
            for bound in spec.get("float", spec.get("int")):
                check(name, bound)
        elif isinstance(spec, dict) and "schedule" in spec:  # the values a schedule takes: both ends of each
            for part in ("value", "start"):
                v = spec["schedule"].get(part, 0.0)
                for bound in (v.get("float", v.get("int", v.get("categorical", []))) if isinstance(v, dict) else [v]):
                    check(name, bound)
        elif not isinstance(spec, dict):
            check(name, spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for name, value in space.sample(study.ask()).items():
        check(name, value)
