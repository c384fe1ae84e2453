"""A study's search stage: one Ray Tune search per method, every method with the same budget of trial-epochs.

The budget is enforced by :class:`BudgetSearcher`, which wraps the Optuna searcher: a trial starts only when
the epochs that finished trials spent plus the full length of every running trial and of the new one fit in
the budget (ASHA's early stops free budget for more trials); no trial is ever cut off by the budget, so the
spent budget (the epochs the trials reported, measured) never exceeds it. Its state is saved with Tune's
experiment state, so an interrupted search (``Tuner.restore``) keeps counting.
"""
from __future__ import annotations

import time
from dataclasses import replace

from ray.tune.search import Searcher


class BudgetSearcher(Searcher):
    """Suggests trials from ``searcher`` while the budget lasts (see the module's docstring)."""

    def __init__(self, searcher: Searcher, budget: int, epochs: int):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher, self.budget, self.epochs = searcher, budget, epochs
        self.live: dict[str, int] = {}  # running trial -> epochs reported so far
        self.spent: dict[str, int] = {}  # finished trial -> epochs it ran

    def committed(self) -> int:
        return sum(self.spent.values()) + self.epochs * len(self.live)

    def suggest(self, trial_id: str):
        if self.committed() + self.epochs > self.budget:
            return Searcher.FINISHED if not self.live else None
        config = self.searcher.suggest(trial_id)
        if config not in (None, Searcher.FINISHED):
            self.live[trial_id] = 0
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.live:
            self.live[trial_id] = max(self.live[trial_id], int(result.get("epoch", 0)))
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ran = self.live.pop(trial_id, 0)
        self.spent[trial_id] = max(ran, int((result or {}).get("epoch", 0)))
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    # Tune saves a wrapper's own state with get_state (the wrapped searcher separately) and restores it with set_state
    def get_state(self) -> dict:
        return {"live": dict(self.live), "spent": dict(self.spent)}

    def set_state(self, state: dict) -> None:
        self.live, self.spent = dict(state["live"]), dict(state["spent"])


def run_trial(config: dict, *, run, teachers: dict, space, parent_run_id: str, prefix: str, folder: str,
              place: dict, tags: dict) -> None:
    """Tune's function for one trial of a study's search: the method's TorchTrainer with the sampled values
    (``space``: the loaded SearchSpace; its file, e.g. a plugin's, need not exist on the trial's node)."""
    import optuna
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train import launch

    values = {**space.fixed, **space.sample(optuna.trial.FixedTrial(dict(config)))}
    cfg = run.resolve(teachers, trial=values)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = replace(cfg, placement=replace(cfg.placement, name=f"{prefix}-{trial_id}", storage_path=folder, **place))
    launch(cfg, parent_run_id=parent_run_id, callbacks=[TuneReportCallback()], quiet=True, check_storage=False,
           tags={**tags, "trial_id": trial_id})


def run_search(study, run, teachers: dict) -> dict:
    """Run (or continue) the search ``run`` (search/METHOD); returns its record."""
    import functools

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .. import search_space, tracking
    from ..methods import selected_by
    from ..train import cpus_each
    from ..tune import best_score, collect, make_searcher

    d, method = run.detail, run.method
    metric = selected_by(method)  # what picks the method's checkpoint ranks its trials: val/pgd10_acc, natural val/clean_acc
    name = f"search-{method}"
    root = study.path("tune")
    exp_path = study.path("tune", name)
    space = search_space.load(method, d["search_space"])
    cfg = run.resolve(teachers)
    workers = max(1, cfg.placement.workers)
    place = {"tracking_uri": study.uri}
    if cfg.placement.cpus_per_worker is None:
        place["cpus_per_worker"] = cpus_each(d["max_concurrent"] * workers)
    tags = study.tags("search", method)
    parent = tracking.open_run(study.uri, study.experiment, f"{study.plan.name}/{run.key}", tracking.KIND_SEARCH,
                               tags=tags, parent=study.stage_run("search"),
                               params={"budget_trial_epochs": d["trial_epochs"], "epochs": d["epochs"],
                                       "sampler": d["sampler"], "scheduler": d["scheduler"],
                                       "search_space": d["search_space"]})
    trainable = tune.with_resources(functools.partial(
        run_trial, run=run, teachers=teachers, space=space, parent_run_id=parent,
        prefix=f"{study.plan.name}-{method}", folder=study.path("runs", "search", method), place=place, tags=tags),
        {"cpu": 0, "memory": 64 * 1024**2})
    from ..trialevents import TrialEvents  # tune's console: one line per finished, stopped or failed trial

    progress = TrialEvents(study.event, epochs=d["epochs"], metric=metric, prefix=f"{run.key}: ",
                           budget=d["trial_epochs"], starts=False)
    t0 = time.time()
    if tune.Tuner.can_restore(exp_path):
        study.event(f"{run.key}: continuing the interrupted search")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        scheduler = None
        if d["scheduler"] == "asha":
            scheduler = ASHAScheduler(metric=metric, mode="max", time_attr="epoch", max_t=d["epochs"] + 1,
                                      grace_period=d["grace_period"], reduction_factor=2)
        searcher = BudgetSearcher(make_searcher(space, [metric], d["sampler"], d["seed"]), d["trial_epochs"], d["epochs"])
        tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=max(d["max_trials"], 1),
            max_concurrent_trials=d["max_concurrent"]),
            run_config=tune.RunConfig(name=name, storage_path=root, verbose=0, callbacks=[progress],
                                      failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if d["scheduler"] == "none":  # without early stopping every trial that did not fail runs all its epochs
        unfinished += sum(1 for r in grid if r.error is None and int((r.metrics or {}).get("epoch", 0)) < d["epochs"])
    if unfinished:  # Tune stopped (a signal): never recorded as done
        raise KeyboardInterrupt(f"{run.key}: the search stopped with {unfinished} trial(s) unfinished")
    trials = collect(grid, replace(cfg, placement=replace(cfg.placement, tracking_uri=study.uri,
                                                          experiment=study.experiment)), parent, root)
    # runs of trials that an interrupted attempt started after Tune last saved its state: Tune never knew them
    known = {t["mlflow_run_id"] for t in trials}
    orphans = [r.info.run_id for r in tracking.find_runs(study.uri, study.experiment, parent=parent)
               if r.info.run_id not in known]
    if orphans:
        tracking.delete_runs(study.uri, orphans)
        study.event(f"{run.key}: deleted {len(orphans)} MLflow run(s) of trials the interrupted attempt never recorded")
    ok = [t for t in trials if t["status"] in ("COMPLETED", "STOPPED")]
    best = max(ok, key=lambda t: best_score(t, -1.0), default=None)  # its kept checkpoint's selection accuracy
    if best is None:
        tracking.close_run(study.uri, parent, "FAILED", "no trial of the search finished")
        raise RuntimeError(f"{run.key}: no trial finished: {trials[0]['error'] if trials else 'no trials ran'}")
    spent = sum(t["epochs_completed"] for t in trials)
    hours = sum(float((r.metrics or {}).get("time_total_s", 0.0)) for r in grid) * workers / 3600
    tracking.log_batch(study.uri, parent, metrics={"trial_epochs": spent, "num_trials": len(trials),
                                                   "device_hours": hours,
                                                   **{f"best/{k}": v for k, v in best["metrics"].items()}},
                       tags={"best_trial": best["trial_id"]})
    tracking.close_run(study.uri, parent, "FINISHED")
    study.event(f"{run.key}: done: {len(trials)} trials, {spent} of {d['trial_epochs']} trial-epochs, best trial "
                f"{best['trial_id']} ({metric} {best_score(best, float('nan')):.4f}), "
                f"{time.time() - t0:.0f}s")
    import optuna

    values = {**space.fixed, **space.sample(optuna.trial.FixedTrial(dict(best["params"])))}
    return {"method": method, "mlflow_run_id": parent, "best_params": values, "best_trial": best["trial_id"],
            "trials": len(trials), "trial_epochs": spent, "budget_trial_epochs": d["trial_epochs"],
            "device_hours": hours, "trial_list": trials}
