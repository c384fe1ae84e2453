"""A study's report: the papers' table over the final runs only, the search budgets, the device-hours of each
stage, the published figures beside each row, a test of each method's AA against the best one's, and the
Pareto plot (clean vs AA, per-seed points). Every figure of a row comes from the study's evaluation of the
final runs, all on the same first ``n_examples`` test images.

Like with like: each published row printed beside ours names the paper, the table and the setting it came
from (raydistill.reference's ``training``: epochs, learning-rate decays, weight decay, hyperparameters such as
τ and α, as the paper states them), and the row compared is the one closest to our final runs' setting
(:func:`published`). Where our setting (the method's presets, the study's schedule and the search's best
values) differs from the row's, the row is marked † and a line under the table says in what; a row whose paper
does not state its setting ("we trained the baselines following their original settings") is marked ‡."""
from __future__ import annotations

import math
import statistics
from typing import Any

COLUMNS = (("clean_acc", "Clean"), ("fgsm_acc", "FGSM"), ("pgd20_acc", "PGD-20"), ("cw_acc", "CW-inf"), ("aa_acc", "AA"))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(plan, searches: dict, evals: dict, finals: dict) -> dict[str, dict]:
    """The study summary's ``methods`` (CONTRACT.md): per method its best values, search, final runs, mean, std."""
    out = {}
    for m in plan.spec.methods:
        s = searches[f"search/{m.name}"]
        rows = []
        for seed in plan.spec.final.seeds:
            e, f = evals[f"eval/{m.name}/seed{seed}"], finals[f"final/{m.name}/seed{seed}"]
            rows.append({"seed": seed, "mlflow_run_id": f.get("mlflow_run_id"), "checkpoint": f.get("checkpoint"),
                         "epochs_completed": f.get("epochs_completed"), "metrics": e["metrics"],
                         "evaluation_run_id": e.get("mlflow_run_id"), "n_examples": e["n_examples"]})
        keys = [k for k, _ in COLUMNS if all(k in r["metrics"] for r in rows)]
        stats = {k: mean_std([r["metrics"][k] for r in rows]) for k in keys}
        out[m.name] = {"best_params": s["best_params"],
                       "search": {"trials": s["trials"], "trial_epochs": s["trial_epochs"],
                                  "budget_trial_epochs": s["budget_trial_epochs"], "device_hours": s["device_hours"],
                                  "mlflow_run_id": s["mlflow_run_id"]},
                       "final": rows, "n": len(rows),
                       "mean": {k: v[0] for k, v in stats.items()}, "std": {k: v[1] for k, v in stats.items()},
                       "final_device_hours": sum(finals[f"final/{m.name}/seed{r['seed']}"].get("device_hours", 0)
                                                 for r in rows),
                       "plugins": code_of([finals[f"final/{m.name}/seed{r['seed']}"] for r in rows])}
    return out


def code_of(records: list[dict]) -> dict[str, dict]:
    """The plugins the final runs' code came from: name -> {source, digests} (two digests: the plugin changed
    during the study, resumed with --allow-changed-plugin)."""
    seen: dict[str, dict] = {}
    for r in records:
        for name, p in (r.get("plugins") or {}).items():
            entry = seen.setdefault(name, {"source": p.get("source"), "digests": []})
            if p.get("digest") not in entry["digests"]:
                entry["digests"].append(p.get("digest"))
    return seen


def aa_tests(methods: dict) -> tuple[str | None, dict[str, dict]]:
    """Each method's per-seed AA against the best method's (highest mean AA): Welch's two-sided t-test."""
    have = {m: [r["metrics"]["aa_acc"] for r in v["final"] if "aa_acc" in r["metrics"]] for m, v in methods.items()}
    have = {m: xs for m, xs in have.items() if xs}
    if not have:
        return None, {}
    best = max(have, key=lambda m: statistics.fmean(have[m]))
    out = {}
    for m, xs in have.items():
        if m == best:
            continue
        ys = have[best]
        if len(xs) < 2 or len(ys) < 2:
            out[m] = {"p": None, "differs": None, "why": "fewer than 2 seeds"}
            continue
        from scipy import stats

        if statistics.pstdev(xs) == 0 and statistics.pstdev(ys) == 0:
            p = 1.0 if statistics.fmean(xs) == statistics.fmean(ys) else 0.0
        else:
            p = float(stats.ttest_ind(xs, ys, equal_var=False).pvalue)
        out[m] = {"p": p, "differs": bool(p < 0.05)}
    return best, out


DIFFERS, UNSTATED = "†", "‡"  # a published row whose setting differs from ours / that its paper does not state


def our_setting(plan, method: str, best_params: dict | None = None) -> dict[str, Any]:
    """The final runs' setting in raydistill's names (epochs, lr, lr_milestones, weight_decay, hyperparameters):
    the planned configuration of the first seed (the method's presets and the study's schedule) with the
    search's best values on top."""
    cfg = plan.run(f"final/{method}/seed{plan.spec.final.seeds[0]}").config
    out = {"epochs": cfg.epochs, "lr": cfg.lr, "lr_milestones": list(cfg.lr_milestones),
           "weight_decay": cfg.weight_decay, **cfg.hp}
    out.update(best_params or {})
    return out


def _distance(row, ours: dict | None) -> float:
    """How far the row's setting lies from ours: the values that differ, half a one where the paper does not say."""
    from .. import reference

    if ours is None:
        return 0.0
    return len(reference.differences(row, ours)) + (0.5 if row.training is None or not row.training.stated else 0.0)


def published(plan, method: str, ours: dict | None = None) -> list:
    """The published rows of the study's dataset, student and eps for ``method``, the one to compare first: the
    same teacher architecture as the study's robust teacher, then rows that report AA, rows of the method itself
    (no ``variant``: an ensemble, an ablation, one of CAT-AKA's students), read directly (not ``reconstructed``),
    then the fewest values of the setting that differ from ``ours`` (our_setting), then the file's order."""
    from .. import reference

    try:
        eps = next(r.config.eps for r in plan.runs() if r.kind == "final")
        rows = reference.published(method, plan.spec.dataset, plan.spec.student, eps=eps)
    except Exception:  # noqa: BLE001 - a method or dataset the reference does not know: no published figures
        return []
    from .plan import teachers_needed

    teacher = plan.spec.teachers.get("robust")
    if teachers_needed(method) and teacher is not None and teacher.arch:  # the same teacher architecture first
        same = [r for r in rows if r.setting.teacher == teacher.arch]
        rows = same or rows
    return sorted(rows, key=lambda r: ("aa_acc" not in r.metrics, r.setting.variant is not None, r.reconstructed,
                                       _distance(r, ours)))


def mark(row, ours: dict) -> str:
    """† where the row's setting differs from ours, ‡ where its paper does not state it, else nothing."""
    from .. import reference

    if reference.differences(row, ours):
        return DIFFERS
    return UNSTATED if row.training is None or not row.training.stated else ""


def footnote(method: str, row, ours: dict) -> str | None:
    """The line under the table for a marked row: in what our setting differs, or that the paper does not say."""
    from .. import reference

    diff = reference.differences(row, ours)
    if diff:
        what = "; ".join(f"{k} {_value(a)} here, {_value(b)} there" for k, (a, b) in diff.items())
        return f"{DIFFERS} {method}: {row.source} ({row.training.where if row.training else 'setting not recorded'}) " \
               f"trained otherwise: {what}"
    if row.training is None or not row.training.stated:
        quote = f': "{row.training.quote[0]}"' if row.training is not None else ""
        return f"{UNSTATED} {method}: {row.source} does not state its row's setting{quote}"
    return None


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "none"
    return f"{v:g}" if isinstance(v, float) else "-" if v is None else str(v)


def beside(plan, method: str, mean: dict, ours: dict | None = None) -> str:
    """The published figures of the row closest to our setting (:func:`published`), named by paper, table and
    setting, marked † / ‡ (:func:`mark`), and ours minus theirs."""
    from .. import reference

    rows = published(plan, method, ours)
    if not rows:
        return "none: a plugin's method (no paper)" if _is_plugin(method) else "-"
    r = rows[0]
    diff = reference.compare(mean, r)
    figs = [f"{label} {_pct(r.metrics[k])}" + (f" ({100 * diff[k]:+.2f})" if k in diff else "")
            for k, label in COLUMNS if k in r.metrics]
    tag = mark(r, ours) if ours is not None else ""
    return f"{r.paper.short} T{r.table.number} [{reference.setting_text(r)}]{tag}: " + ", ".join(figs)


def _is_plugin(method: str) -> bool:
    from ..origins import plugin_of

    return plugin_of("method", method) is not None


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def markdown(plan, methods: dict, stage_hours: dict, n_images: int, diagnostics: bool = False) -> str:
    from .. import reference

    best, tests = aa_tests(methods)
    cols = [c for c in COLUMNS if any(c[0] in v["mean"] for v in methods.values())]
    lines = [f"# Study {plan.name}", "",
             f"{plan.spec.dataset}, student {plan.spec.student}; final runs only (seeds "
             f"{', '.join(map(str, plan.spec.final.seeds))}), every figure on the same first {n_images} test images. "
             "Accuracies in %, mean ± std over seeds (n = seeds).", "",
             "| method | arch | " + " | ".join(c[1] for c in cols) + " | n | search trials | trial-epochs (budget) "
             "| AA vs best | published (ours − published) |", "|" + "---|" * (len(cols) + 7)]
    ours = {m: our_setting(plan, m, v.get("best_params")) for m, v in methods.items()}
    notes = []
    for m, v in methods.items():
        cells = [f"{_pct(v['mean'].get(k))} ± {_pct(v['std'].get(k))}" if k in v["mean"] else "-" for k, _ in cols]
        t = tests.get(m)
        vs = "best" if m == best else ("-" if t is None else "n/a (" + t["why"] + ")" if t["p"] is None
                                        else f"{'differs' if t['differs'] else 'within noise'} (p = {t['p']:.3g})")
        s = v["search"]
        lines.append(f"| {m} | {plan.spec.student} | " + " | ".join(cells) +
                     f" | {v['n']} | {s['trials']} | {s['trial_epochs']} ({s['budget_trial_epochs']}) | {vs} "
                     f"| {beside(plan, m, v['mean'], ours[m])} |")
        rows = published(plan, m, ours[m])
        note = footnote(m, rows[0], ours[m]) if rows else None
        notes += [note] if note else []
    lines += [""] + notes + ([""] if notes else [])
    lines += ["AA vs best: Welch's two-sided t-test of the per-seed AA accuracies against the method with the "
              "highest mean AA; 'differs' at p < 0.05. Published: the same dataset, student, eps (and teacher "
              "architecture) in raydistill.reference, the row closest to our setting, with the setting it came from "
              f"[in brackets]; {DIFFERS}: our final runs' setting (the method's presets, the study's schedule, the "
              f"search's best values) differs from it; {UNSTATED}: its paper does not state it. Every such row below.",
              ""]
    for m, v in methods.items():  # which code made each plugin's row; two versions in one row are said loudly
        for name, c in (v.get("plugins") or {}).items():
            versions = ", ".join(c["digests"])
            lines.append(f"Plugin {name} ({c['source']}, {versions}) gave {m}'s row; no paper reports it." if len(c["digests"]) < 2
                         else f"**{m}'s final runs span {len(c['digests'])} versions of plugin {name}** ({versions}): "
                              "it changed while the study ran (resumed with --allow-changed-plugin).")
    lines += ["", "## Published figures for the same setting", ""]
    any_pub = False
    for m, v in methods.items():
        for row in published(plan, m, ours[m]):
            any_pub = True
            diff = reference.compare(v["mean"], row)
            figs = ", ".join(f"{k} {_pct(val)} (ours − published {100 * diff[k]:+.2f})" if k in diff else
                             f"{k} {_pct(val)}" for k, val in row.metrics.items())
            variant = f", {row.setting.variant}" if row.setting.variant else ""
            lines.append(f"* {m}: {row.source}{variant} [{reference.setting_text(row)}]{mark(row, ours[m])}: {figs}")
    if not any_pub:
        lines.append(f"No paper reports these methods on {plan.spec.dataset} with {plan.spec.student}.")
    lines += ["", "## Device-hours by stage (measured: wall time × workers)", "",
              "| stage | device-hours |", "|---|---|"]
    lines += [f"| {k} | {h:.4f} |" for k, h in stage_hours.items()]
    lines += ["", "Search trials are in MLflow under each search run (tag stage=search); the final runs carry "
              "tag is_final=true.", "", "![clean vs AA](pareto.png)", ""]
    if diagnostics:
        lines += ["## Guidance diagnostics per epoch", "", "The final runs' validation diagnostics (e.g. the peer's or "
                  "teacher's accuracy on the student's adversarial examples), mean over seeds, band ± std.", "",
                  "![diagnostics](diagnostics.png)", ""]
    return "\n".join(lines)


def pareto_plot(methods: dict, path: str) -> bool:
    """Clean vs AA (else the strongest attack evaluated) of the final runs: per-seed points and the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next((k for k in ("aa_acc", "cw_acc", "pgd20_acc", "fgsm_acc")
                if all(k in r["metrics"] for v in methods.values() for r in v["final"])), None)
    if key is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (m, v) in enumerate(methods.items()):
        color = f"C{i % 10}"
        xs = [r["metrics"]["clean_acc"] for r in v["final"] if "clean_acc" in r["metrics"]]
        ys = [r["metrics"][key] for r in v["final"] if "clean_acc" in r["metrics"]]
        ax.scatter(xs, ys, color=color, alpha=0.5, s=20)
        if xs:
            ax.scatter([statistics.fmean(xs)], [statistics.fmean(ys)], color=color, marker="*", s=140, label=m)
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel(key.replace("_acc", "").upper() + " accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("final runs: seeds (dots) and mean (star)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary(plan, parent: str, report_uri: str, methods: dict, stage_hours: dict) -> dict[str, Any]:
    best, tests = aa_tests(methods)
    return {"study": plan.name, "mlflow_run_id": parent, "report": report_uri, "methods": methods,
            "device_hours": stage_hours, "aa_best": best, "aa_tests": tests}
