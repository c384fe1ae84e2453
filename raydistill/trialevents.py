"""The console of a Ray Tune search, tune's and a study's alike: one line per trial event, from a Tune callback.

Tune's own tables are off (``RAY_AIR_NEW_OUTPUT=0`` and ``verbose=0``: Tune's old output engine, which prints
nothing at that verbosity), so is its traceback of each failed trial (``TUNE_PRINT_ALL_TRIAL_ERRORS=0``: the
trial's ``error.txt`` keeps it), and the driver forwards no output of Ray's workers and actors (``log_to_driver``
False: the trials' per-epoch lines, and the warning of Ray Train's placement group cleaner, an actor that
removes the worker group of a trial Tune stopped). What a user needs comes from :class:`TrialEvents` instead:

* ``trial ID started: NAME=VALUE ...`` (the trial's sampled values; a study leaves these lines out),
* ``trial ID finished after N of E epochs, kept checkpoint's val/pgd10_acc 0.4521 (last epoch 0.4388)``, or
  ``stopped by ASHA after ...`` (the kept checkpoint's accuracy by the method's selection ranks the trial),
* ``trial ID failed after N of E epochs: <the root cause, one line>``.

``tune --verbose`` brings Tune's tables and the workers' lines back.
"""
from __future__ import annotations

from typing import Any, Callable

from ray.tune import Callback


def short(v: Any) -> str:
    """A trial's value, briefly (floats to 4 significant digits)."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class TrialEvents(Callback):
    """One line per trial event through ``say`` (module docstring). ``epochs``: a trial's full length; ``metric``:
    the method's selection (val/pgd10_acc, natural val/clean_acc); ``prefix``: before "trial" (a study's
    ``search/METHOD: ``); ``budget``: trial-epochs, said after each end; ``starts``: the started lines."""

    def __init__(self, say: Callable[[str], None], *, epochs: int, metric: str, prefix: str = "",
                 budget: int | None = None, starts: bool = True):
        self.say, self.epochs, self.metric, self.prefix = say, epochs, metric, prefix
        self.budget, self.starts = budget, starts

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.starts:
            values = " ".join(f"{k}={short(v)}" for k, v in sorted((trial.config or {}).items()))
            self.say(f"{self.prefix}trial {trial.trial_id} started: {values or '(no sampled values)'}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "finished" if "test/clean_acc" in (trial.last_result or {}) else "stopped by ASHA")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "failed", reason(trial))

    def _end(self, trial, what: str, why: str | None = None) -> None:
        r = trial.last_result or {}
        text = f"{self.prefix}trial {trial.trial_id} {what} after {int(r.get('epoch', 0))} of {self.epochs} epochs"
        if why:
            text += f": {why}"
        elif "val/best_acc" in r:  # what ranks the trial: its kept (best) checkpoint's accuracy by the selection
            text += f", kept checkpoint's {self.metric} {r['val/best_acc']:.4f}"
            if self.metric in r:
                text += f" (last epoch {r[self.metric]:.4f})"
        if self.budget is not None:
            text += f" (budget {self.budget} trial-epochs)"
        self.say(text)


def reason(trial) -> str:
    """The root cause of a failed trial, on one line: Tune has just written its exception to the trial's local folder
    (``error.pkl``, else the text in ``error.txt``), from where it is copied to the storage later."""
    import os

    import cloudpickle

    from .train import root_cause

    try:
        if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
            with open(trial.pickled_error_file, "rb") as f:
                return root_cause(cloudpickle.load(f))[:500]
        exc = trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 - the reason is a courtesy: the trial's row says it too
        exc = None
    return root_cause(exc)[:500] if exc is not None else "see error.txt in the trial's folder"
