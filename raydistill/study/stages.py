"""A study's training and evaluation stages: teachers, the seeded final runs (in parallel), their evaluation.

Each run is skipped when its record exists; an interrupted training run is relaunched with the same name
(``launch`` resumes it from its checkpoint and reuses its MLflow run), an interrupted evaluation with the
same ``run_evaluation`` name (its finished batches are kept).
"""
from __future__ import annotations

import time
from dataclasses import replace

from ..train import TrainingFailed, launch, root_cause


def _placed(study, cfg, name: str, folder: str, **extra):
    return replace(cfg, placement=replace(cfg.placement, name=name, storage_path=folder, tracking_uri=study.uri,
                                          experiment=study.experiment, **extra))


def hours(summary: dict, workers: int) -> float:
    return float(summary.get("wall_time_s") or 0.0) * max(1, workers) / 3600


def run_teachers(study, stage) -> dict[str, str]:
    """Train (or reuse) the study's teachers; returns ``{"teacher/ROLE": checkpoint}``."""
    out = {}
    for run in stage.runs:
        if run.detail.get("given"):
            out[run.key] = run.detail["given"]
            continue
        rec = study.record(run.key)
        if rec is None:
            role = run.key.split("/", 1)[1]
            cfg = _placed(study, run.resolve(), f"{study.plan.name}-teacher-{role}", study.path("runs", "teachers"))
            study.event(f"{run.key}: training ({run.method}, {cfg.student}, {cfg.epochs} epochs)")
            s = launch(cfg, parent_run_id=study.stage_run("teachers"), quiet=True, check_storage=False,
                       tags=study.tags("teachers", run.method))
            rec = {**s, "device_hours": hours(s, cfg.placement.workers)}
            study.write_record(run.key, rec)
            study.event(f"{run.key}: finished, {s['epochs_completed']} epochs, checkpoint {s['checkpoint']}")
        out[run.key] = rec["checkpoint"]
    return out


def _final_task(cfg, parent: str, tags: dict) -> dict:
    return launch(cfg, parent_run_id=parent, quiet=True, check_storage=False, tags=tags)


def run_finals(study, stage, teachers: dict, searches: dict) -> dict[str, dict]:
    """Every final run (method x seed) at the final schedule with its search's best values, several at once
    (Ray tasks that each start a TorchTrainer); returns key -> record."""
    import ray

    from ..train import cpus_each

    out, todo = {}, []
    for run in stage.runs:
        rec = study.record(run.key)
        if rec is not None:
            out[run.key] = rec
        else:
            todo.append(run)
    if not todo:
        return out
    spec = study.plan.spec
    at_once = max(1, min(len(todo), spec.search.max_concurrent))
    workers = max(1, todo[0].config.placement.workers)
    cpus = todo[0].config.placement.cpus_per_worker or cpus_each(at_once * workers)
    task = ray.remote(num_cpus=0, max_retries=0)(_final_task)
    parent = study.stage_run("final")
    pending: dict = {}

    def submit(run):
        best = searches[f"search/{run.method}"]["best_params"]
        seed = run.detail["seed"]
        cfg = _placed(study, run.resolve(teachers, trial=best), f"{study.plan.name}-{run.method}-seed{seed}",
                      study.path("runs", "final"), cpus_per_worker=cpus)
        pending[task.remote(cfg, parent, study.tags("final", run.method, seed, final=True))] = (run, cfg)
        study.event(f"{run.key}: started ({cfg.epochs} epochs)")

    queue, failed = list(todo), []
    while queue or pending:
        while queue and len(pending) < at_once:
            submit(queue.pop(0))
        done, _ = ray.wait(list(pending), num_returns=1)
        run, cfg = pending.pop(done[0])
        try:
            s = ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - the others finish and are recorded; then the study stops
            failed.append(f"{run.key}: {root_cause(exc)}")
            study.event(f"{run.key}: failed: {root_cause(exc)}")
            queue.clear()
            continue
        rec = {**s, "seed": run.detail["seed"], "params": searches[f"search/{run.method}"]["best_params"],
               "device_hours": hours(s, cfg.placement.workers)}
        study.write_record(run.key, rec)
        out[run.key] = rec
        study.event(f"{run.key}: finished, {s['epochs_completed']} epochs, best epoch {s['best_epoch']}, "
                    f"test {_m(s['metrics'])}")
    if failed:
        raise TrainingFailed(f"{len(failed)} final run(s) failed; {failed[0]}")
    return out


def _m(metrics: dict) -> str:
    from .records import fmt_metrics

    return fmt_metrics(metrics) or "-"


def run_evaluations(study, stage, finals: dict) -> dict[str, dict]:
    """Every final run's best checkpoint attacked on the same first n_examples test images; key -> record."""
    from .. import tracking
    from ..evaluate import evaluate_on_cluster, mlflow_metrics

    out = {}
    for run in stage.runs:
        rec = study.record(run.key)
        if rec is not None:
            out[run.key] = rec
            continue
        final = finals[run.needs[0]]
        d = run.detail
        t0 = time.time()
        s = evaluate_on_cluster(final["checkpoint"], list(d["attacks"]), eps=d["eps"], step_size=d["step_size"],
                                n_examples=d["n_examples"], batch_size=d["batch_size"], storage_path=study.folder,
                                name=run.key.replace("/", "-"), quiet=True)
        wall = time.time() - t0
        seed = final["seed"]
        tags = study.tags("evaluation", run.method, seed)  # is_final=true: the final training runs only
        metrics = mlflow_metrics(s)
        eval_run = tracking.open_run(study.uri, study.experiment, f"{study.plan.name}/{run.key}", tracking.KIND_EVAL,
                                     tags={**tags, "final_run": final.get("mlflow_run_id") or ""},
                                     parent=study.stage_run("evaluation"),
                                     params={"checkpoint": final["checkpoint"], "attacks": ",".join(d["attacks"]),
                                             "n_examples": s["n_examples"], "eps": d["eps"]})
        tracking.log_batch(study.uri, eval_run, metrics=metrics)
        tracking.close_run(study.uri, eval_run, "FINISHED")
        if final.get("mlflow_run_id"):  # the final run holds the study's figures too: the compare view lines them up
            tracking.log_batch(study.uri, final["mlflow_run_id"],
                               metrics={k.replace("test/", "study/"): v for k, v in metrics.items()})
        rec = {"method": run.method, "seed": seed, "final": run.needs[0], "checkpoint": final["checkpoint"],
               "mlflow_run_id": eval_run, "metrics": s["metrics"], "aa_components": s.get("aa_components"),
               "n_examples": s["n_examples"], "worst_acc": s["worst_acc"], "per_image": s["per_image"],
               "evaluation": s["evaluation"], "wall_time_s": round(wall, 2), "device_hours": wall * s["workers"] / 3600}
        study.write_record(run.key, rec)
        out[run.key] = rec
        study.event(f"{run.key}: done on {s['n_examples']} test images: {_m(s['metrics'])} ({wall:.0f}s)")
    return out
