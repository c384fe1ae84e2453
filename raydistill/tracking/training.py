"""What training runs and searches log: their start (tags, params), checkpoints, curves, per-epoch
metrics (rank 0, ``EpochLogger``) and the repair of the runs of trials that Tune cut off."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from .runs import KIND_RUN, KIND_SEARCH, client, close_run, open_run


def flat_params(cfg) -> dict[str, str]:
    d = cfg.to_dict()
    hp = d.pop("hp")
    d.update(d.pop("placement"))  # one flat list of parameters, as the option table names them
    skip = {"tracking_uri", "mlflow_run_id"}
    out = {k: str(v) for k, v in d.items() if k not in skip and v is not None}
    out.update({f"hp.{k}": str(v) for k, v in sorted(hp.items())})
    return {k: v[:500] for k, v in out.items()}


def run_tags(cfg) -> dict[str, str]:
    """What the report groups runs by (method, arch, dataset) and tells them apart by (seed), the
    validation metric that picks the best checkpoint (selected_by: val/pgd10_acc, natural val/clean_acc)
    and the method's preset keys the configuration got (presets: e.g. "cifar10 + cifar10/wrn34_10", "none")."""
    from ..methods import selected_by

    return {"method": cfg.method, "dataset": cfg.dataset, "arch": cfg.student, "seed": str(cfg.seed),
            "selected_by": selected_by(cfg.method), "presets": " + ".join(cfg.method_presets) or "none"}


def start_run(cfg, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Create (or reuse, for a relaunched --name) the training run for ``cfg`` (with ``tags`` besides the
    run's own); returns its id."""
    p = cfg.placement
    return open_run(p.tracking_uri, p.experiment, p.name, KIND_RUN, tags={**run_tags(cfg), **(tags or {})},
                    params=flat_params(cfg),
                    parent=parent_run_id)


def start_search(cfg, name: str, params: dict[str, Any], space_file: str) -> str:
    """Create (or reuse, for --resume) the parent run of search ``name``, with its space file as an artifact."""
    return open_run(cfg.placement.tracking_uri, cfg.placement.experiment, name, KIND_SEARCH, tags=run_tags(cfg), params=params,
                    artifacts={space_file: "search_space"})


def repair_trial(uri: str, run, outcome: str, checkpoint_dir: str | None = None, error: str | None = None) -> None:
    """Close the run of a trial from what Tune saw (``outcome``: COMPLETED, STOPPED or ERROR).

    A trial that Tune stops (ASHA) or that is cut off while closing can leave its run RUNNING, or
    FAILED when the stop reached the trial's own error handler first. A COMPLETED trial trained and
    tested, only its closing step was cut off: its checkpoints are logged and the run FINISHED; a
    STOPPED one is KILLED with tag stopped_early=asha; an ERROR one still RUNNING is FAILED with ``error``.
    """
    run_id = run.info.run_id
    if run.info.status == "FINISHED":
        return
    if outcome == "COMPLETED":
        if checkpoint_dir:
            log_checkpoint(uri, run_id, checkpoint_dir)
        close_run(uri, run_id, "FINISHED")
    elif outcome == "STOPPED":
        close_run(uri, run_id, "KILLED", tags={"stopped_early": "asha"})
    elif run.info.status == "RUNNING":
        close_run(uri, run_id, "FAILED", reason=error or "")


def log_checkpoint(uri: str, run_id: str, checkpoint_dir: str) -> None:
    """The best and last student of a checkpoint folder (local or remote storage), as artifacts, and the best one
    as the run's MLflow Model (``runs:/<run id>/model``: :func:`.models.log_model`) (driver side). A model that
    cannot be logged is one ``warning:`` line and the run's tag ``model_not_logged``: the checkpoint stands."""
    import sys

    from .. import storage
    from ..checkpoint import LAST_MODEL_FILE, MODEL_FILE
    from .models import log_model

    c = client(uri)
    best = None
    for fname, sub in ((MODEL_FILE, "checkpoints/best"), (LAST_MODEL_FILE, "checkpoints/last")):
        path = storage.join(checkpoint_dir, fname)
        if storage.exists(path):
            local = str(storage.local_copy(path, "checkpoint file"))
            c.log_artifact(run_id, local, artifact_path=sub)
            best = best or (local if fname == MODEL_FILE else None)
    if best is not None:
        try:
            log_model(uri, run_id, best)
        except Exception as exc:  # noqa: BLE001 - the run's checkpoint is logged; its model form is an extra
            from ..errors import first_line

            c.set_tag(run_id, "model_not_logged", first_line(exc)[:500])
            print(f"warning: run {run_id}: its best checkpoint was not logged as an MLflow Model: {first_line(exc)}",
                  file=sys.stderr, flush=True)


def log_curves(uri: str, run_id: str) -> None:
    """Per-epoch curves of the validation metrics and diagnostics, as plots/curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = client(uri)
    keys = sorted(k for k in c.get_run(run_id).data.metrics if k.startswith("val/") and "best" not in k
                  and k != "val/selected_student")
    if not keys:
        return
    acc = [k for k in keys if k.endswith("_acc")]
    other = [k for k in keys if k not in acc]
    panels = [p for p in (acc, other) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, group in zip(axes[0], panels):
        for k in group:
            hist = sorted(c.get_metric_history(run_id, k), key=lambda m: m.step)
            ax.plot([m.step + 1 for m in hist], [m.value for m in hist], marker="o", ms=3, label=k[4:])
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if group is acc else "value")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(c.get_run(run_id).info.run_name or run_id)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "curves.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        c.log_artifact(run_id, path, artifact_path="plots")


def log_resolved(uri: str, run_id: str, values: dict[str, Any]) -> None:
    """Settings decided at launch (e.g. GPUs per worker when not given), as params/tags."""
    c = client(uri)
    params = c.get_run(run_id).data.params
    for k, v in values.items():
        if k not in params:
            c.log_param(run_id, k, str(v))
        elif params[k] != str(v):
            c.set_tag(run_id, f"resolved.{k}", str(v))


class EpochLogger:
    """Rank 0's MLflow writer: per-epoch metrics exactly once, final test figures, checkpoints.

    An epoch is logged at most once, whatever happened before: a worker killed after logging an
    epoch but before Ray registered that epoch's checkpoint redoes the epoch from the previous
    checkpoint (with the same RNG states, so the same figures), and a request that timed out after
    the server stored it is not sent again. The set of logged epochs is read from MLflow when the
    worker starts (no other writer logs to the run while it lives) and kept up to date after.
    """

    PROBE = "val/pgd10_acc"  # logged every epoch, in the same atomic log_batch as the rest

    def __init__(self, uri: str, run_id: str):
        self.c, self.run_id = client(uri), run_id
        self.logged = self._steps(self.PROBE)

    def _steps(self, key: str) -> set[int]:
        """The steps at which ``key`` is logged in this run."""
        return {m.step for m in self.c.get_metric_history(self.run_id, key)}

    def backfill(self, history: list[dict]) -> None:
        """Log epochs present in the checkpoint's history that MLflow lacks (after a crash)."""
        for m in history:
            self.log_epoch(int(m["epoch"]) - 1, m)

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if epoch in self.logged:
            return
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, epoch) for k, v in metrics.items()
              if isinstance(v, (int, float)) and k not in ("epoch",)]
        self._retry(lambda: self.c.log_batch(self.run_id, metrics=ms),
                    done=lambda: epoch in self._steps(self.PROBE))
        self.logged.add(epoch)

    def log_final(self, final: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        # step = epochs the figures reflect: a relaunch with more epochs adds a step, a relaunch
        # after a crash between this call and the run's end does not log the same figures twice
        step = int(final["epochs_completed"])
        done = lambda: step in self._steps("test/clean_acc")
        if not self._retry(done):
            now = int(time.time() * 1000)
            ms = [Metric(k, float(v), now, step) for k, v in final.items() if k.startswith("test/")]
            self._retry(lambda: self.c.log_batch(self.run_id, metrics=ms), done=done)
        self.c.set_tag(self.run_id, "epochs_completed", str(final["epochs_completed"]))
        self.c.set_tag(self.run_id, "best_epoch", str(final["best_epoch"]))
        self.c.set_tag(self.run_id, "best_is_averaged", str(bool(final.get("best_is_averaged"))).lower())

    @staticmethod
    def _retry(fn, tries: int = 5, done=lambda: False):
        """Call fn, retrying with back-off; before a retry, ``done()`` says whether it took after all."""
        for i in range(tries):
            try:
                return fn()
            except Exception:
                if i == tries - 1:
                    raise
                time.sleep(0.5 * 2 ** i)
                try:
                    if done():
                        return None
                except Exception:
                    pass
