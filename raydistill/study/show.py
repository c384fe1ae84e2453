"""``format_plan``: the plan as ``--dry-run`` prints it (stages, runs, budgets, estimated device-hours)."""
from __future__ import annotations

import os

from .plan import Plan, Run, exists_locally, study_dir


def hours(h: float) -> str:
    if h >= 100:
        return f"{h:,.0f}"
    if h >= 0.1:
        return f"{h:.2f}"
    return f"{h:.4f}"


def shorter(path: str) -> str:
    """A path relative to the working folder when it lies inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def pixels(v: float) -> str:
    """A pixel-scale value, with its n/255 form when it is one (8/255)."""
    n = v * 255
    return f"{v:.4g} ({round(n)}/255)" if abs(n - round(n)) < 1e-6 and round(n) else f"{v:.4g}"


def _rows(runs: tuple[Run, ...], text) -> list[str]:
    width = max((len(r.key) for r in runs), default=0)
    return [f"  {r.key:<{width}}  {hours(r.device_hours):>9}  {text(r)}" for r in runs]


def format_plan(plan: Plan) -> str:
    s, st = plan.spec, {stage.name: stage for stage in plan.stages}
    first = next((r.config for r in plan.runs() if r.config is not None))
    where = study_dir(plan)
    there = exists_locally(plan)
    lines = [f"study {plan.name} ({s.file})",
             f"  dataset {s.dataset}, student {s.student}" + (f", peer {s.peer}" if s.peer else "")
             + f"; threat model L-inf eps {pixels(first.eps)}, step {pixels(first.step_size)}, {first.attack_steps} steps",
             f"  methods ({len(s.methods)}): {', '.join(m.name for m in s.methods)}",
             f"  runs under {where}" + (" (exists: --resume continues it)" if there else "")
             + f"; MLflow: {plan.tracking_uri or 'MLflow default (MLFLOW_TRACKING_URI, else ./mlflow.db)'}",
             "", "columns: run key, estimated device-hours, what it does", ""]
    n = len(plan.stages)

    def head(i: int, name: str, what: str) -> None:
        lines.append(f"stage {i}/{n} {name}: {what}, {hours(st[name].device_hours)} device-hours")

    teachers = st["teachers"].runs
    head(1, "teachers", f"{len(teachers)} teacher(s), shared by every offline method" if teachers else "none needed")
    lines += _rows(teachers, lambda r: f"given: {r.detail['given']}" + (f" ({r.detail['arch']})" if r.detail["arch"] else "")
                   if "given" in r.detail else f"{r.method} on {r.detail['arch']}, seed {r.config.seed}: {r.detail['schedule']}")
    sr = s.search
    budget = (f"{sr.trial_epochs} trial-epochs per method" if sr.trial_epochs is not None else
              f"{sr.device_hours:g} device-hours per method (trial-epochs by the estimate)")
    sched = f"{sr.scheduler} (grace {sr.grace_period} epochs)" if sr.scheduler == "asha" else "no early stopping"
    head(2, "search", f"budget {budget}, trials of {sr.epochs} epochs, {sr.sampler} sampler, {sched}, "
         f"{sr.max_concurrent} at a time, seed {sr.seed}")
    lines += _rows(st["search"].runs, lambda r: (
        f"{r.detail['trial_epochs']} trial-epochs = {r.detail['trials']} trials"
        + (f" (up to {r.detail['max_trials']} if ASHA stops some early)" if r.detail["max_trials"] != r.detail["trials"] else "")
        + f"; space {shorter(r.detail['search_space'])}"))
    finals = st["final"].runs
    head(3, "final", f"{len(finals)} runs ({len(s.methods)} methods x seeds {', '.join(map(str, s.final.seeds))}), "
         "each: its search's best values on top of the schedule shown")
    lines += _rows(finals, lambda r: r.detail["schedule"])
    evals = st["evaluation"].runs
    e = evals[0].detail if evals else {}
    head(4, "evaluation", f"{len(evals)} runs: {', '.join(s.evaluation.attacks)} on the same first "
         f"{e.get('n_examples')} test images, eps {pixels(e.get('eps', 0))}, step {pixels(e.get('step_size', 0))}, "
         f"batch {s.evaluation.batch_size}, {s.evaluation.max_concurrent} at a time")
    lines += _rows(evals, lambda r: f"the best checkpoint of {r.needs[0]}")
    head(5, "report", "the comparison table (mean and std over seeds per method), the study summary JSON")
    lines += _rows(st["report"].runs, lambda r: f"after {len(r.needs)} evaluations")
    total = sum(len(x.runs) for x in plan.stages)
    lines += ["", f"total: {total} runs, {hours(plan.device_hours)} device-hours (estimated: " +
              ", ".join(f"{x.name} {hours(x.device_hours)}" for x in plan.stages) + ")",
              "", "the estimate assumes:"] + [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)
