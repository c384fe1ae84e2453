"""``python -m raydistill.tune METHOD [options]``: a resumable hyperparameter search.

Ray Tune runs one trial per hyperparameter sample; each trial is a function that runs the method's
TorchTrainer to completion (the Ray Train V2 pattern, metrics forwarded by TuneReportCallback).
OptunaSearch (seeded multivariate TPE, or random, or a multi-objective clean/robust search) proposes
samples from search_spaces/METHOD.yaml; ASHA stops weak trials early on val/pgd10_acc (natural
training: val/clean_acc, the accuracy its runs keep their best checkpoint by, Method.selection), and
trials are ranked by val/best_acc, their kept checkpoint's accuracy by that selection.
MLflow: one parent run per search, one child run per trial (created by the trial's own launch).
The console: one line per trial event (started with its values, finished or stopped by ASHA with its kept
checkpoint's accuracy, failed with the reason: raydistill.trialevents, as a study's searches), one per top-k
AutoAttack, then the table and the summary; ``--verbose`` adds Tune's tables and the trials' own lines.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# Ray reads this when it is imported: without it, it folds progress lines that differ only in numbers
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from . import plugins, provenance
from .cli import ArgParser, nonneg_float, positive_int
from .config import TrainConfig, add_run_options, build_config, flags_of, parse_set
from .errors import UsageError, cli_entry

OBJECTIVES = {"robust": "val/pgd10_acc", "clean": "val/clean_acc"}
DEFAULT_OBJECTIVES = {"val/pgd10_acc": "robust", "val/clean_acc": "clean"}  # by the method's selection
# --preset quickstart: digits + small_cnn, 8 trials, 2 at a time: minutes on a 2-core machine
TUNE_PRESETS = {"quickstart": dict(num_samples=8, max_concurrent=2, grace_period=2, top_k=1, aa_n_examples=100)}


def parser() -> ArgParser:
    p = ArgParser(prog="python -m raydistill.tune", description="Search a method's hyperparameters with Ray Tune + Optuna.")
    p.add_argument("method", help="method name (see python -m raydistill.train --list)")
    add_run_options(p, helps={"name": "search name (default tune-METHOD-DATASET-TIME); --resume continues it"})
    g = p.add_argument_group("search")
    g.add_argument("--num-samples", type=positive_int, help="trials (default 8)")
    g.add_argument("--max-concurrent", type=positive_int, help="trials at once (default 2)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted search --name")
    g.add_argument("--search-space", help="YAML file (default search_spaces/METHOD.yaml)")
    g.add_argument("--objectives", help="robust (val/pgd10_acc) or clean,robust for a Pareto search (default robust; "
                   "natural: clean, its selection)")
    g.add_argument("--search", choices=["tpe", "random"], default="tpe", help="Optuna sampler (default tpe, multivariate, seeded)")
    g.add_argument("--scheduler", choices=["asha", "none"], default="asha",
                   help="early stopping (default asha on val/pgd10_acc; natural: val/clean_acc)")
    g.add_argument("--grace-period", type=positive_int, help="ASHA's minimum epochs per trial (default 2)")
    g.add_argument("--gpus-per-trial", type=nonneg_float, help="GPUs per trial, split over its workers (0.5 packs two trials on a GPU)")
    g.add_argument("--top-k", type=int, help="AutoAttack on the k best trials at the end (default 1; 0 = none)")
    g.add_argument("--aa-n-examples", type=positive_int, help="test images for AutoAttack (default 1000)")
    g.add_argument("--verbose", action="store_true", help="Ray Tune's tables and every trial's own lines (per epoch) "
                   "besides the one line per trial event")
    plugins.add_option(p)
    return p


T0 = time.time()  # the console's clock (module level: Tune pickles the callback that prints with it)


def say(text: str) -> None:
    """One line of the search's console: ``[tune H:MM:SS] text``."""
    s = int(time.time() - T0)
    print(f"[tune {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}] {text}", flush=True)


# ============================================================================= one trial
def run_trial(config: dict, *, method: str, flags: dict, hp: dict, space, parent_run_id: str, search: str) -> None:
    """The Tune function: one TorchTrainer run. The trial's sampled values are the configuration's top
    layer, above the search's own flags and ``--set`` values (resolved once, here). ``space``: the loaded
    SearchSpace (its file, e.g. a plugin's, need not exist on the trial's node)."""
    import optuna
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from . import storage
    from .config import resolve
    from .train import launch

    values = {**space.fixed, **space.sample(optuna.trial.FixedTrial(dict(config)))}
    place = dict(flags, name=f"{search}-{ray.tune.get_context().get_trial_id()}",
                 storage_path=storage.join(flags["storage_path"], search, "trials"))
    launch(resolve(method, place, hp, trial=values), parent_run_id=parent_run_id,
           callbacks=[TuneReportCallback()], quiet=False, check_storage=False)


# ============================================================================= the driver
def parse_objectives(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in OBJECTIVES for n in names) or len(set(names)) != len(names):
        raise UsageError(f"--objectives {text!r}; choose robust, clean, or clean,robust for a Pareto search")
    return [OBJECTIVES[n] for n in names]


def make_searcher(space, objectives: list[str], kind: str, seed: int):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if kind == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=4)

    metric = objectives[0] if len(objectives) == 1 else objectives
    mode = "max" if len(objectives) == 1 else ["max"] * len(objectives)
    return OptunaSearch(space=functools.partial(_define_by_run, space=space), metric=metric, mode=mode, sampler=sampler)


def _define_by_run(trial, *, space) -> None:
    """Optuna define-by-run (module level so the searcher can be pickled for --resume)."""
    space.sample(trial)


def main(argv: list[str] | None = None) -> int:
    from . import search_space, storage, tracking
    from .train import cpus_each, init_ray, preflight, require_shared_storage, write_json

    args = parser().parse_args(argv)
    plugins.use(args.plugin)
    cfg = build_config(args.method, args)
    extra = TUNE_PRESETS.get(args.preset or "", {})
    num_samples = args.num_samples or extra.get("num_samples", 8)
    max_concurrent = args.max_concurrent or extra.get("max_concurrent", 2)
    grace = args.grace_period or extra.get("grace_period", 2)
    top_k = extra.get("top_k", 1) if args.top_k is None else args.top_k
    if top_k < 0:
        raise UsageError(f"--top-k {top_k} must be >= 0")
    aa_n = args.aa_n_examples or extra.get("aa_n_examples", 1000)
    from .methods import selected_by
    from .userdata import label

    selection = selected_by(cfg.method)  # val/pgd10_acc, natural val/clean_acc
    args.objectives = args.objectives or DEFAULT_OBJECTIVES[selection]
    objectives = parse_objectives(args.objectives)
    if args.scheduler == "asha" and grace > cfg.epochs:
        raise UsageError(f"--grace-period {grace} is longer than --epochs {cfg.epochs}")
    space = search_space.load(args.method, args.search_space)
    p = cfg.placement
    if p.in_process:
        raise UsageError("--workers 0 (in-process) is not available for tune: each trial is a Ray Train run; give --workers >= 1")
    name = p.name or f"tune-{cfg.method}-{label(cfg.dataset)}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = storage.root(p.storage_path)
    exp_path = storage.join(root, name)
    from ray import tune

    if args.resume:
        if not tune.Tuner.can_restore(exp_path):
            raise UsageError(f"--resume: no search named '{name}' under {root}; give the --name and --storage-path of the interrupted search")
    elif storage.exists(exp_path):
        raise UsageError(f"a search named '{name}' already exists under {root}; add --resume to continue it or choose another --name")
    preflight(cfg)
    used = provenance.used_by(cfg)  # which code: a resumed search's plugins must be those it started with
    changes = provenance.check_resume(exp_path, used, cfg.placement.allow_changed_plugin, f"search '{name}'") \
        if args.resume else {}
    # the search's placement, filled once; each trial gets its own name and folder under it
    place = {"storage_path": root, "tracking_uri": tracking.resolve_uri(p.tracking_uri)}
    if args.gpus_per_trial is not None:
        place["gpus_per_worker"] = args.gpus_per_trial / p.workers
    tracking.check_reachable(place["tracking_uri"])
    if not args.verbose:  # Tune's old output engine, which prints no table at verbose=0 (the new one does), and no
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # traceback of a failed trial (its failed line gives the root cause,
        os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "0"  # the trial's error.txt the traceback)
    init_ray(log_to_driver=args.verbose)  # the workers' and actors' lines only with --verbose
    require_shared_storage(root)
    if p.cpus_per_worker is None:  # concurrent trials share the CPUs without oversubscription
        place["cpus_per_worker"] = cpus_each(max_concurrent * p.workers)
    cfg = replace(cfg, placement=replace(p, **place))
    parent = start_parent(cfg, name, space, num_samples, args)
    if used or changes:
        tracking.log_batch(cfg.placement.tracking_uri, parent, tags=provenance.tags(used, changes))
    provenance.record(exp_path, used, changes)
    t0 = time.time()
    trainable = tune.with_resources(
        functools.partial(run_trial, method=cfg.method, flags={**flags_of(args), **place}, hp=parse_set(args.set),
                          space=space, parent_run_id=parent, search=name),
        {"cpu": 0, "memory": 64 * 1024**2})  # the trial function only waits on its TorchTrainer
    from .trialevents import TrialEvents

    try:
        if args.resume:  # Tune restores the search's callbacks (its console) with it
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
        else:
            scheduler = None
            if args.scheduler == "asha":
                from ray.tune.schedulers import ASHAScheduler

                # max_t one past the last epoch: ASHA never stops a trial on its final report, so the
                # trial closes its own MLflow run (checkpoints, plots) before it ends
                scheduler = ASHAScheduler(metric=selection, mode="max", time_attr="epoch", max_t=cfg.epochs + 1,
                                          grace_period=grace, reduction_factor=2)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=make_searcher(space, objectives, args.search, cfg.seed),
                                            scheduler=scheduler, num_samples=num_samples,
                                            max_concurrent_trials=max_concurrent),
                run_config=tune.RunConfig(name=name, storage_path=root, verbose=1 if args.verbose else 0,
                                          callbacks=[TrialEvents(say, epochs=cfg.epochs, metric=selection)],
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        grid = tuner.fit()
    except KeyboardInterrupt:
        tracking.close_run(cfg.placement.tracking_uri, parent, "KILLED")
        raise
    from . import resources

    resources.release_placement_groups()  # the trials' reservations are gone before the AutoAttack step starts
    try:
        trials = collect(grid, cfg, parent, root)
        failed = run_autoattack(trials, cfg, top_k, aa_n, exp_path) if top_k else []
        s = tune_summary(cfg, name, parent, trials, objectives, time.time() - t0, args)
        finish_parent(cfg, parent, s, failed[0] if failed else None)
    except BaseException as exc:  # the search's end never leaves its parent run RUNNING
        from .train import root_cause

        reason = root_cause(exc)
        tracking.close_run(cfg.placement.tracking_uri, parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", reason)
        if isinstance(exc, (KeyboardInterrupt, UsageError)):
            raise
        raise UsageError(f"the search's trials ran, but its end failed: {reason}") from None
    print_table(s)
    if args.summary_json:
        write_json(args.summary_json, s)
    if failed:
        print(f"error: AutoAttack failed on {len(failed)} of the best trials: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def start_parent(cfg: TrainConfig, name: str, space, num_samples: int, args) -> str:
    from . import tracking

    return tracking.start_search(cfg, name, {
        "search_space": str(space.path), "num_samples": num_samples, "search": args.search, "scheduler": args.scheduler,
        "objectives": args.objectives, "epochs": cfg.epochs, "method": cfg.method, "dataset": cfg.dataset,
        "student": cfg.student}, str(space.path))


def collect(grid, cfg: TrainConfig, parent: str, root: str) -> list[dict[str, Any]]:
    """One row per trial, with its MLflow child run and its checkpoint's full location (``root``'s scheme:
    Ray reports s3:// paths without it); runs of early-stopped trials are closed."""
    from . import storage, tracking

    children = {r.data.tags.get(tracking.NAME_TAG): r for r in
                tracking.find_runs(cfg.placement.tracking_uri, cfg.placement.experiment, parent=parent)}
    rows = []
    for res in grid:
        m = res.metrics or {}
        trial_id = m.get("trial_id") or (res.path and Path(res.path).name.split("_")[-2])
        run = next((r for n, r in children.items() if n and n.endswith(str(trial_id))), None)
        status = "ERROR" if res.error else ("COMPLETED" if "test/clean_acc" in m else "STOPPED")
        checkpoint = storage.uri_of(root, m["checkpoint_path"]) if m.get("checkpoint_path") else None
        # A trial that Tune stops (ASHA) or that is cut off while closing can leave its run RUNNING, or
        # FAILED when the stop reached the trial's own error handler first: the run is set from what Tune saw.
        if run is not None:
            tracking.repair_trial(cfg.placement.tracking_uri, run, status, checkpoint,
                                  _one_line(res.error) if res.error else None)
        params = {k: v for k, v in (res.config or {}).items()}
        rows.append({
            "trial_id": str(trial_id), "status": status, "params": params,
            "epochs_completed": int(m.get("epochs_completed", 0)),
            "mlflow_run_id": run.info.run_id if run else None,
            "checkpoint": checkpoint,
            "error": _one_line(res.error) if res.error else None,
            "metrics": {k.replace("/", "_"): v for k, v in m.items()
                        if isinstance(v, (int, float)) and (k.startswith("test/") or k in VAL_KEPT)},
        })
    return rows


# the validation figures a trial's row keeps: the last epoch's, and those of its kept (best) checkpoint
VAL_KEPT = ("val/pgd10_acc", "val/clean_acc", "val/best_acc", "val/best_clean_acc", "val/best_pgd10_acc")


def best_score(trial: dict, default: float) -> float:
    """A trial's rank: its kept checkpoint's validation accuracy by its method's selection (val/best_acc;
    a trial logged before that metric existed: val/best_pgd10_acc, what every method selected by)."""
    m = trial["metrics"]
    return m.get("val_best_acc", m.get("val_best_pgd10_acc", default))


def run_autoattack(trials: list[dict], cfg: TrainConfig, k: int, n: int, folder: str) -> list[str]:
    """AutoAttack (standard) on the k best completed trials' checkpoints, each sharded over the cluster's
    workers (one per GPU, else per CPU) with its per-image results under ``folder``/evaluations (a relaunch
    with --resume reuses them). The trial's test attacks (clean, FGSM, PGD-20...) are run again on the same
    first ``n`` test images, so that every figure of the trial's row comes from the same images: they replace
    the trial's test figures (``test_n_examples`` says how many images; the run's figures on the whole test
    split stay in MLflow as ``test_all/*``). Returns one line per trial whose AutoAttack failed."""
    from . import tracking
    from .evaluate import evaluate_on_cluster, mlflow_metrics
    from .train import root_cause

    done = [t for t in trials if t["status"] == "COMPLETED" and t["checkpoint"]]
    done.sort(key=lambda t: best_score(t, 0.0), reverse=True)
    attacks = list(dict.fromkeys([*cfg.test_attacks, "aa"]))
    failed = []
    for t in done[:k]:
        try:
            s = evaluate_on_cluster(t["checkpoint"], attacks, n_examples=n, storage_path=folder,
                                    name=f"trial-{t['trial_id']}", worker_wait=cfg.placement.worker_wait, quiet=True)
        except Exception as exc:  # noqa: BLE001 - said in one line, the search's run is FAILED with it
            t["error"] = f"AutoAttack: {root_cause(exc)}"
            failed.append(f"trial {t['trial_id']}: {root_cause(exc)}")
            say(f"AutoAttack on trial {t['trial_id']} failed: {root_cause(exc)}")
            continue
        m = t["metrics"]
        whole = {key: m[key] for key in list(m) if key.startswith("test_")}
        for key in whole:  # the whole split's figures would sit beside AA's subset in one row
            del m[key]
        m.update({f"test_{key}": v for key, v in s["metrics"].items()})
        m.update(test_worst_acc=s["worst_acc"], test_n_examples=s["n_examples"])
        if t["mlflow_run_id"]:
            tracking.log_batch(cfg.placement.tracking_uri, t["mlflow_run_id"], metrics={
                **{f"test_all/{key[5:]}": v for key, v in whole.items() if isinstance(v, (int, float))},
                **mlflow_metrics(s), "test/n_examples": s["n_examples"]})
        say(f"AutoAttack on trial {t['trial_id']} ({s['n_examples']} test images, {s['workers']} workers; its other "
            f"test figures on the same images): {s['metrics']['aa_acc']:.4f}")
    return failed


def tune_summary(cfg, name, parent, trials, objectives, wall, args) -> dict[str, Any]:
    ok = [t for t in trials if t["status"] in ("COMPLETED", "STOPPED")]
    key = objectives[0].replace("/", "_")
    best = max(ok, key=lambda t: best_score(t, t["metrics"].get(key, -1.0)), default=None)
    pareto = []
    if len(objectives) > 1:
        pts = [(t["metrics"].get("val_clean_acc", 0), t["metrics"].get("val_pgd10_acc", 0), t) for t in ok]
        pareto = [t["trial_id"] for a, b, t in pts if not any(a2 >= a and b2 >= b and (a2, b2) != (a, b) for a2, b2, _ in pts)]
    return {"method": cfg.method, "dataset": cfg.dataset, "name": name, "mlflow_run_id": parent,
            "tracking_uri": cfg.placement.tracking_uri, "search": args.search, "scheduler": args.scheduler,
            "objectives": objectives, "num_trials": len(trials),
            "trial_epochs": sum(t["epochs_completed"] for t in trials),
            "wall_time_s": round(wall, 1), "trials": trials, "best": best, "pareto_front": pareto,
            "plugins": provenance.used_by(cfg)}


def finish_parent(cfg, parent: str, s: dict, failure: str | None = None) -> None:
    """Log the search's figures to its parent run and close it: FINISHED, or FAILED with ``failure``."""
    from . import tracking

    best = s["best"] or {"metrics": {}}
    tracking.log_batch(cfg.placement.tracking_uri, parent, metrics={
        "trial_epochs": s["trial_epochs"], "num_trials": s["num_trials"],
        **{f"best/{k}": v for k, v in best["metrics"].items()}})
    tracking.close_run(cfg.placement.tracking_uri, parent, "FAILED" if failure else "FINISHED", failure,
                       tags={"best_trial": best["trial_id"]} if s["best"] else None)


def print_table(s: dict) -> None:
    from .trialevents import short

    cols = ["trial", "status", "epochs", "val_pgd10", "clean", "pgd20", "aa", "params"]
    rows = []
    for t in s["trials"]:
        m = t["metrics"]
        f = lambda k: f"{m[k]:.4f}" if k in m else "-"  # noqa: E731
        params = " ".join(f"{k}={short(v)}" for k, v in sorted(t["params"].items()))
        rows.append([t["trial_id"], t["status"], str(t["epochs_completed"]), f("val_best_pgd10_acc"),
                     f("test_clean_acc"), f("test_pgd20_acc"), f("test_aa_acc"), params])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths))  # noqa: E731
    print("\n" + line(cols) + "\n" + "\n".join(line(r) for r in rows))
    b = s["best"]
    print(f"\n{s['num_trials']} trials, {s['trial_epochs']} trial-epochs, {s['wall_time_s']:.0f}s; "
          f"best: {b['trial_id'] if b else '-'}; MLflow parent run {s['mlflow_run_id']}")


def _one_line(err: Any) -> str:
    """The innermost meaningful line of a trial's error (Ray wraps the trial's exception twice)."""
    from .train import root_cause

    return root_cause(err)[:500] if isinstance(err, BaseException) else str(err).strip()[-500:]


run = cli_entry(main)

if __name__ == "__main__":
    run()
