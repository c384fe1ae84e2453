"""Running a study's plan in one Ray job: teachers -> search -> final -> evaluation -> report.

Each finished run leaves its record in ``<storage>/<study>/records/<run key>.json`` (:mod:`.records`); a
relaunch with the same name (``--resume``, or simply the same ``--name``) skips the recorded runs, relaunches
an interrupted training run under its own name (it resumes from its checkpoint, in the same MLflow run),
restores an interrupted search (``Tuner.restore``: no finished trial is redone) and continues an interrupted
evaluation (its finished batches are kept). MLflow: one parent run per study, a child run per stage, the
searches, trials, final runs and evaluations below those, tagged study / stage / method / seed / is_final.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from ..errors import UsageError
from .plan import Plan

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's old output engine: verbose=0 prints no tables at all
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # a failed trial: its one line (raydistill.trialevents)
# Ctrl-C is a KeyboardInterrupt inside a search too: Tune's own handler ends the search "gracefully" and returns
# its unfinished trials as if it were done, which the study would record
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")


STUDY_FILE = "study.yaml"


def run_study(plan: Plan, args: argparse.Namespace) -> int:
    """Run ``plan`` (``args``: the command line: resume, summary_json...); returns the exit code."""
    from .. import provenance, storage, tracking
    from ..train import init_ray, require_shared_storage, root_cause, write_json
    from .plan import study_dir
    from .records import Study

    folder = study_dir(plan)
    started = storage.exists(storage.join(folder, STUDY_FILE))
    if args.resume and not started:
        raise UsageError(f"--resume: no study named '{plan.name}' under {plan.root}; give the --name and "
                         "--storage-path of the interrupted study")
    used = provenance.used_by_all(r.config for r in plan.runs() if r.config is not None)  # which code (provenance)
    changes = provenance.check_resume(folder, used, args.allow_changed_plugin, f"study '{plan.name}'") if started else {}
    uri = tracking.resolve_uri(plan.tracking_uri)
    tracking.check_reachable(uri)
    experiment = next((r.config.placement.experiment for r in plan.runs() if r.config is not None), "raydistill")
    study = Study(plan, folder, uri, experiment)
    init_ray(log_to_driver=False)
    require_shared_storage(plan.root)
    if not storage.is_remote(folder):
        os.makedirs(folder, exist_ok=True)
    if not started:  # the study's folder holds the file it was started with: a relaunch finds it
        storage.upload(str(plan.spec.path), storage.join(folder, STUDY_FILE))
    provenance.record(folder, used, changes)
    study.parent = tracking.open_run(uri, experiment, plan.name, "study", tags=study.tags("study"),
                                     params={"dataset": plan.spec.dataset, "student": plan.spec.student,
                                             "methods": ",".join(m.name for m in plan.spec.methods),
                                             "seeds": ",".join(map(str, plan.spec.final.seeds)),
                                             "study_file": str(plan.spec.path)})
    if used or changes:
        tracking.log_batch(uri, study.parent, tags=provenance.tags(used, changes))
    study.event(("continuing" if started else "starting") + f" in {folder}; MLflow run {study.parent} ({uri})")
    try:
        s = _stages(study)
    except BaseException as exc:
        stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))
        if os.environ.get("RAYDISTILL_DEBUG"):
            import traceback

            traceback.print_exc()
        reason = "interrupted" if stopped else root_cause(exc)
        for run in [*study.stage_runs.values(), study.parent]:
            try:
                tracking.close_run(uri, run, "KILLED" if stopped else "FAILED", reason)
            except Exception:  # noqa: BLE001 - the store may be the problem
                pass
        if stopped:
            print(f"[study {plan.name}] interrupted: what finished is recorded in {folder}; the same command with "
                  "--resume continues from there", file=sys.stderr, flush=True)
        if stopped or isinstance(exc, UsageError):
            raise
        print(f"error: the study stopped: {reason}; what finished is recorded: relaunch with --name {plan.name} "
              "--resume to continue", file=sys.stderr, flush=True)
        return 1
    if args.summary_json:
        write_json(args.summary_json, s)
    return 0


def _stages(study) -> dict:
    from .. import resources, tracking
    from .search import run_search
    from .stages import run_evaluations, run_finals, run_teachers

    plan = study.plan
    stages = {s.name: s for s in plan.stages}
    t = time.time()
    teachers = run_teachers(study, stages["teachers"])
    if stages["teachers"].runs:
        study.close_stage("teachers")
        study.event(f"stage teachers: done ({len(teachers)} teacher(s), {time.time() - t:.0f}s)")
    t, searches = time.time(), {}
    for run in stages["search"].runs:
        rec = study.record(run.key)
        if rec is None:
            rec = run_search(study, run, teachers)
            study.write_record(run.key, rec)
            resources.release_placement_groups(study.event)  # nothing of its trials stays reserved for the next
        else:
            study.event(f"{run.key}: recorded ({rec['trials']} trials, {rec['trial_epochs']} trial-epochs)")
        searches[run.key] = rec
    study.close_stage("search", {"trial_epochs": sum(r["trial_epochs"] for r in searches.values())})
    study.event(f"stage search: done ({sum(r['trials'] for r in searches.values())} trials, "
                f"{time.time() - t:.0f}s this session)")
    t = time.time()
    finals = run_finals(study, stages["final"], teachers, searches)
    resources.release_placement_groups(study.event)  # the evaluations get every CPU the final runs had
    study.close_stage("final")
    study.event(f"stage final: done ({len(finals)} runs, {time.time() - t:.0f}s this session)")
    t = time.time()
    evals = run_evaluations(study, stages["evaluation"], finals)
    study.close_stage("evaluation")
    study.event(f"stage evaluation: done ({len(evals)} evaluations, {time.time() - t:.0f}s this session)")
    s = report(study, searches, finals, evals, teachers, register_models(study, finals, evals))
    tracking.close_run(study.uri, study.parent, "FINISHED")
    study.event(f"done: report {s['report']}; MLflow UI: {tracking.ui_link(study.uri, study.experiment)}")
    return s


def register_models(study, finals: dict, evals: dict) -> dict[str, str]:
    """Each method's best final model (by the study's AutoAttack, else PGD-20) in MLflow's Model Registry, as a
    version of ``<study>-<method>`` (tracking.register_best); returns method -> ``models:/NAME/VERSION``."""
    from .. import tracking

    candidates: dict[str, list[dict]] = {}
    for rec in evals.values():
        final = finals.get(rec["final"], {})
        candidates.setdefault(rec["method"], []).append({"mlflow_run_id": final.get("mlflow_run_id"), "seed": rec["seed"],
                                                         "metrics": rec["metrics"]})
    done = tracking.register_best(study.uri, study.plan.name, candidates)
    if done:
        study.event("registered models: " + ", ".join(done.values()))
    return done


def report(study, searches: dict, finals: dict, evals: dict, teachers: dict, registered: dict | None = None) -> dict:
    """Write report.md, pareto.png and study.json to the study's folder and the study's MLflow run; ``registered``:
    method -> its registered model (``models:/NAME/VERSION``), in the summary as ``registered_model``."""
    from .. import provenance, storage, tracking
    from ..train import write_json
    from . import table

    plan = study.plan
    methods = table.aggregate(plan, searches, evals, finals)
    teacher_hours = sum((study.record(r.key) or {}).get("device_hours", 0.0)
                        for s in plan.stages if s.name == "teachers" for r in s.runs if not r.detail.get("given"))
    hours = {"teachers": teacher_hours, "search": sum(r["device_hours"] for r in searches.values()),
             "final": sum(r.get("device_hours", 0.0) for r in finals.values()),
             "evaluation": sum(r.get("device_hours", 0.0) for r in evals.values())}
    n_images = next(iter(evals.values()))["n_examples"] if evals else 0
    report_uri = study.path("report.md")
    s = table.summary(plan, study.parent, report_uri, methods, hours)
    s["plugins"] = provenance.used_by_all(r.config for r in plan.runs() if r.config is not None)
    for method, model in (registered or {}).items():
        s["methods"].setdefault(method, {})["registered_model"] = model
    with tempfile.TemporaryDirectory() as tmp:
        files = {"report.md": os.path.join(tmp, "report.md"), "study.json": os.path.join(tmp, "study.json")}
        if table.pareto_plot(methods, os.path.join(tmp, "pareto.png")):
            files["pareto.png"] = os.path.join(tmp, "pareto.png")
        if diagnostics_plot(study.uri, finals, os.path.join(tmp, "diagnostics.png")):
            files["diagnostics.png"] = os.path.join(tmp, "diagnostics.png")
        text = table.markdown(plan, methods, hours, n_images, diagnostics="diagnostics.png" in files)
        with open(files["report.md"], "w") as f:
            f.write(text)
        print("\n" + text.split("\n## ")[0], flush=True)  # the table and its notes, on stdout
        write_json(files["study.json"], s)
        for name, local in files.items():
            storage.upload(local, study.path(name))
        run = study.stage_run("report")
        tracking.log_artifacts(study.uri, run, files.values(), "report")
        tracking.log_artifacts(study.uri, study.parent, files.values(), "report")
    metrics = {f"{m}/{k}_mean": v for m, d in methods.items() for k, v in d["mean"].items()}
    metrics.update({f"device_hours/{k}": v for k, v in hours.items()})
    tracking.log_batch(study.uri, study.parent, metrics=metrics)
    study.close_stage("report")
    return s


def diagnostics_plot(uri: str, finals: dict, path: str) -> bool:
    """The final runs' guidance diagnostics per epoch (val/peer_acc_on_student_adv...), mean ± std over seeds per
    method, as the report command draws them; False when no final run logged one."""
    from pathlib import Path

    import pandas as pd

    from .. import report, tracking

    ids = [f["mlflow_run_id"] for f in finals.values() if f.get("mlflow_run_id")]
    if not ids or tracking.is_off(uri):
        return False
    raw = pd.DataFrame(report.diagnostics_rows(uri, tracking.get_runs(uri, ids)))
    if raw.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    return report.plot_diagnostics(report.diagnostics_summary(raw), report.method_colors(raw), Path(path))
