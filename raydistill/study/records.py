"""What a study has finished: one record (a JSON file) per finished run, and its progress lines.

A run's record is written to ``<storage>/<study>/records/<run key>.json`` the moment it finishes (atomically:
a local file is written beside and renamed; a remote object is written whole), and a relaunch skips every
run that has one. Records are the study's own account; MLflow mirrors them.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .. import storage

SESSION_T0 = time.time()  # this driver's start: the progress lines' clock (also for objects Tune unpickles)


@dataclass
class Study:
    """A running study: its plan, where it stores things, its MLflow parent run and its records."""

    plan: Any
    folder: str  # <storage>/<study>
    uri: str  # MLflow tracking URI (resolved)
    experiment: str
    parent: str = ""  # the study's MLflow run
    stage_runs: dict = field(default_factory=dict)  # stage -> its MLflow child run

    # ------------------------------------------------------------------ records
    def record_path(self, key: str) -> str:
        return storage.join(self.folder, "records", *key.split("/")) + ".json"

    def record(self, key: str) -> dict | None:
        """The record of run ``key``, or None when it has not finished."""
        try:
            return json.loads(storage.read_bytes(self.record_path(key)))
        except FileNotFoundError:
            return None

    def write_record(self, key: str, obj: dict) -> None:
        text = json.dumps({"key": key, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **obj}, indent=2, default=str)
        storage.write_bytes(self.record_path(key), text.encode())

    # ------------------------------------------------------------------ places and tags
    def path(self, *parts: str) -> str:
        return storage.join(self.folder, *parts)

    def tags(self, stage: str, method: str | None = None, seed: int | None = None, final: bool = False) -> dict:
        t = {"study": self.plan.name, "stage": stage, "is_final": str(final).lower()}
        if method:
            t["method"] = method
        if seed is not None:
            t["seed"] = str(seed)
        return t

    def stage_run(self, stage: str) -> str:
        """The MLflow child run of ``stage`` under the study's run (the same one on a relaunch)."""
        from .. import tracking

        if stage not in self.stage_runs:
            self.stage_runs[stage] = tracking.open_run(self.uri, self.experiment, f"{self.plan.name}/{stage}", "stage",
                                                       tags=self.tags(stage), parent=self.parent)
        return self.stage_runs[stage]

    def close_stage(self, stage: str, metrics: dict | None = None) -> None:
        from .. import tracking

        run = self.stage_run(stage)
        if metrics:
            tracking.log_batch(self.uri, run, metrics=metrics)
        tracking.close_run(self.uri, run, "FINISHED")

    # ------------------------------------------------------------------ progress
    def event(self, text: str) -> None:
        """One progress line."""
        print(f"[study {self.plan.name} {fmt_time(time.time() - SESSION_T0)}] {text}", flush=True)

    def warn(self, text: str) -> None:
        print(f"[study {self.plan.name}] warning: {text}", file=sys.stderr, flush=True)


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def fmt_metrics(m: dict, keys=("clean_acc", "fgsm_acc", "pgd20_acc", "cw_acc", "aa_acc")) -> str:
    return " ".join(f"{k[:-4]} {m[k]:.4f}" for k in keys if m.get(k) is not None)
