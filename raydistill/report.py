"""``python -m raydistill.report``: the papers' comparison table from the runs recorded in MLflow.

Runs are grouped by their ``method``, ``arch`` and ``dataset`` tags (a plugin's runs also by the digest of its
code, tag ``plugin.NAME``: two versions never share a row); each group's final test
accuracies (Clean, FGSM, PGD-20, CW-inf, AutoAttack) are summarised as mean ± sample standard
deviation (ddof=1) over its runs, which differ by their ``seed`` tag. Search trials (children of a
search run, or a study's search stage) differ by their hyperparameters, not their seeds: they are never
averaged with the final runs. By default the table holds the final runs (``raydistill.train`` runs and a
study's seeded final runs); ``--search`` / ``--parent-run-id`` tabulate one search's trials instead, said
as such. Search parents, a study's teachers, evaluations and earlier reports are never counted. ``Runs``
counts the runs with test figures; runs without any (trials stopped early, runs that failed) are counted
apart.

Compute is reported two ways, summed over a group's runs, with wall = end - start of the MLflow run
(runs that never ended count 0) and workers = max(1, ``workers`` param):

* GPU-hours    = wall x workers x ``gpus_per_worker`` (0 when the run asked for no GPU or did not say)
* device-hours = wall x workers: hours of Ray Train workers, each holding one device (a GPU, a
  share of one, or CPU cores), so CPU-only runs are not shown as free.

Outputs in ``--out``: report.md, table.{csv,parquet}, runs.{csv,parquet}, diagnostics.{csv,parquet},
pareto.png (clean vs AutoAttack accuracy, PGD-20 where AutoAttack is missing) and diagnostics.png
(per-epoch guidance diagnostics such as val/peer_acc_on_student_adv, per method).
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from . import plugins, storage, tracking
from .cli import ArgParser
from .errors import UsageError, cli_entry

# (short name, MLflow key, column title)
METRICS = [("clean", "test/clean_acc", "Clean"), ("fgsm", "test/fgsm_acc", "FGSM"),
           ("pgd20", "test/pgd20_acc", "PGD-20"), ("cw", "test/cw_acc", "CW-inf"), ("aa", "test/aa_acc", "AA")]
GROUP = ["method", "arch", "dataset"]
DIAGNOSTIC = re.compile(r"^val/\w+_acc_on_\w+$")  # val/peer_acc_on_student_adv, val/teacher_acc_on_student_adv, ...


def parser() -> ArgParser:
    p = ArgParser(prog="python -m raydistill.report",
                  description="Comparison table (mean ± std over seeds), Pareto plot and diagnostics curves of MLflow runs.")
    p.add_argument("--tracking-uri", help="MLflow tracking URI: sqlite:///FILE, http(s)://HOST:PORT, databricks or a folder (its mlflow.db) "
                   "(default: MLFLOW_TRACKING_URI, else MLflow's local store)")
    p.add_argument("--experiment", default="raydistill", help="MLflow experiment (default raydistill)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--parent-run-id", metavar="ID", help="only the child runs of this parent run (a search)")
    which.add_argument("--search", metavar="NAME", help="only the trials of the search NAME (tune's --name)")
    p.add_argument("--out", default="report", help="output folder or storage URI (s3://, gs://; default ./report)")
    p.add_argument("--log-to-mlflow", action="store_true",
                   help="also log the outputs as artifacts: of the search's parent run, else of a new 'report' run")
    plugins.add_option(p)
    return p


# ============================================================================= reading MLflow
def find_parent(uri: str, experiment: str, run_id: str | None, search: str | None) -> str | None:
    """The parent run id named by --parent-run-id or --search (None when neither was given)."""
    if run_id:
        if not tracking.run_exists(uri, run_id):
            raise UsageError(f"--parent-run-id {run_id}: no such MLflow run")
        return run_id
    if search:
        found = tracking.find_runs(uri, experiment, kind=tracking.KIND_SEARCH, name=search)
        if not found:
            known = sorted({r.data.tags.get(tracking.NAME_TAG, "?")
                            for r in tracking.find_runs(uri, experiment, kind=tracking.KIND_SEARCH)[:50]})
            raise UsageError(f"--search {search!r}: no search with that name; known searches: {', '.join(known) or 'none'}")
        return found[0].info.run_id
    return None


def run_row(r) -> dict[str, Any]:
    """One run as a flat record: tags, test metrics, wall time and compute."""
    tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
    wall_h = (r.info.end_time - r.info.start_time) / 3.6e6 if r.info.end_time and r.info.start_time else 0.0
    workers = max(1, int(_number(params.get("workers"), 1)))
    gpus = _number(params.get("gpus_per_worker"), 0.0)
    row = {"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
           **{k: tags.get(k, "?") for k in GROUP}, "seed": tags.get("seed", "?"),
           "wall_hours": wall_h, "workers": workers, "gpus_per_worker": gpus,
           "gpu_hours": wall_h * workers * gpus, "device_hours": wall_h * workers}
    row.update({short: metrics.get(key, math.nan) for short, key, _ in METRICS})
    row["tested"] = any(key in metrics for _, key, _ in METRICS)
    code = sorted(f"{k[len('plugin.'):]} {v.split(':')[-1][:8]}" for k, v in tags.items()
                  if k.startswith("plugin.") and k.count(".") == 1)
    if code:  # a plugin's runs: one row per version of its code (raydistill.provenance), never two mixed
        row["method"] = f"{row['method']} (plugin {', '.join(code)})"
    return row


def role(r, searches: set[str]) -> str:
    """``trial`` (a search's child, or a study's search stage), ``teacher`` (a study's) or ``final``."""
    tags = r.data.tags
    if tags.get(tracking.PARENT_TAG) in searches or tags.get("stage") == "search":
        return "trial"
    return "teacher" if tags.get("stage") == "teachers" else "final"


def diagnostics_rows(uri: str, runs: list) -> list[dict[str, Any]]:
    """Per-epoch values of every guidance diagnostic, one record per (run, metric, epoch)."""
    out = []
    for r in runs:
        for key in sorted(k for k in r.data.metrics if DIAGNOSTIC.match(k)):
            for m in tracking.metric_history(uri, r.info.run_id, key):
                out.append({**{k: r.data.tags.get(k, "?") for k in GROUP}, "run_id": r.info.run_id,
                            "metric": key, "epoch": m.step + 1, "value": m.value})
    return out


# ============================================================================= aggregation
def summarise(runs_df):
    """The comparison table: one row per (method, arch, dataset), sorted by dataset, arch, method."""
    import pandas as pd

    rows = []
    for (method, arch, dataset), g in runs_df.groupby(GROUP, sort=True):
        tested = g[g["tested"]]
        row = {"method": method, "arch": arch, "dataset": dataset, "runs": len(tested),
               "seeds": tested["seed"].nunique(), "untested": len(g) - len(tested)}
        for short, _, _ in METRICS:
            vals = g[short].dropna()
            row[f"{short}_mean"] = vals.mean() if len(vals) else math.nan
            row[f"{short}_std"] = vals.std(ddof=1) if len(vals) > 1 else math.nan
            row[f"{short}_n"] = len(vals)
        row["gpu_hours"] = g["gpu_hours"].sum()
        row["device_hours"] = g["device_hours"].sum()
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["dataset", "arch", "method"], ignore_index=True)


def diagnostics_summary(diag_df):
    """Mean, std and count over runs of each diagnostic, per group and epoch."""
    import pandas as pd

    if diag_df.empty:
        return pd.DataFrame(columns=[*GROUP, "metric", "epoch", "mean", "std", "n"])
    agg = diag_df.groupby([*GROUP, "metric", "epoch"])["value"].agg(["mean", "std", "count"]).reset_index()
    return agg.rename(columns={"count": "n"})


# ============================================================================= outputs
def cell(row, short: str) -> str:
    """``84.12 ± 0.35`` in percent; ``(n=k)`` when fewer runs than the group's evaluated runs have it."""
    n = row[f"{short}_n"]
    if not n:
        return "–"
    text = f"{100 * row[f'{short}_mean']:.2f}"
    if n > 1:
        text += f" ± {100 * row[f'{short}_std']:.2f}"
    evaluated = max(row[f"{s}_n"] for s, _, _ in METRICS)
    return text + (f" (n={n})" if n < evaluated else "")


def markdown(table, source: str, n_runs: int, plots: dict[str, str | None], pareto_note: str,
             trials: bool = False, left_out: str = "") -> str:
    """``trials``: the table is a search's trials (different hyperparameters, not seeds)."""
    what = "trials" if trials else "runs"
    head = ["Method", "Arch", "Dataset", *(t for _, _, t in METRICS), "Trials" if trials else "Runs",
            *([] if trials else ["Seeds"]), "Stopped" if trials else "Untested", "GPU-h", "Device-h"]
    spread = ("mean ± sample std over the search's trials, which differ by their hyperparameters: the spread is "
              "the search's, not seed noise (final seeded runs: train the best configuration with several "
              "--seed, or run a study)" if trials else "mean ± sample std over final runs (seeds)")
    untested = ("Stopped: trials stopped before their test figures (ASHA), not in the figures" if trials else
                "Untested: runs without test figures (failed or unfinished), not in the figures")
    lines = [f"# raydistill report\n\n{source}; {n_runs} {what}; written {time.strftime('%Y-%m-%d %H:%M:%S')}.\n",
             f"Test accuracy in %, {spread}; `(n=k)`: only k {what} have that figure. {untested}. "
             "GPU-h = Σ wall × workers × gpus_per_worker; Device-h = Σ wall × workers "
             "(a worker holds one GPU, a GPU share or CPU cores).\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in table.iterrows():
        vals = [row["method"], row["arch"], row["dataset"], *(cell(row, s) for s, _, _ in METRICS),
                str(row["runs"]), *([] if trials else [str(row["seeds"])]), str(row["untested"]),
                f"{row['gpu_hours']:.2f}", f"{row['device_hours']:.2f}"]
        lines.append("| " + " | ".join(vals) + " |")
    lines.append("")
    if left_out:
        lines += [left_out, ""]
    if plots["pareto"]:
        lines += ["## Clean vs robust accuracy", "", pareto_note, "", f"![pareto]({plots['pareto']})", ""]
    if plots["diagnostics"]:
        lines += ["## Guidance diagnostics per epoch", "",
                  "Mean over runs (band: ± std) of each method's validation diagnostics.", "",
                  f"![diagnostics]({plots['diagnostics']})", ""]
    return "\n".join(lines)


def method_colors(runs_df) -> dict[str, Any]:
    """One colour per method, the same in every plot."""
    import matplotlib.pyplot as plt

    return {m: plt.cm.tab10(i % 10) for i, m in enumerate(sorted(runs_df["method"].unique()))}


def _panels(plt, n: int, height: float, per_row: int = 3):
    """A figure with ``n`` panels, at most ``per_row`` per row; the unused ones are hidden."""
    rows, cols = math.ceil(n / per_row), min(n, per_row)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, height * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _label(row, multi: bool) -> str:
    return f"{row['method']} ({row['arch']})" if multi else row["method"]


def plot_pareto(table, runs_df, colors: dict, path: Path) -> tuple[bool, str]:
    """Clean vs AutoAttack accuracy per group (PGD-20 where AA is missing), one panel per dataset."""
    import matplotlib.pyplot as plt

    table = table[(table["clean_n"] > 0) & ((table["aa_n"] > 0) | (table["pgd20_n"] > 0))]
    if table.empty:
        return False, ""
    fallback = bool((table["aa_n"] == 0).any())
    ylabel = {(False, True): "AutoAttack accuracy (%)", (True, False): "PGD-20 accuracy (%) (no AutoAttack results)",
              (True, True): "AutoAttack accuracy (%); PGD-20 where AA is missing (hollow)"}[
        (fallback, bool((table["aa_n"] > 0).any()))]
    datasets = sorted(table["dataset"].unique())
    fig, axes = _panels(plt, len(datasets), height=4.8)
    for ax, ds in zip(axes, datasets):
        sub = table[table["dataset"] == ds]
        multi = sub["arch"].nunique() > 1
        pts = []
        for _, row in sub.iterrows():
            key = "aa" if row["aa_n"] else "pgd20"
            x, y = 100 * row["clean_mean"], 100 * row[f"{key}_mean"]
            xerr, yerr = (100 * row[f"{k}_std"] if row[f"{k}_n"] > 1 else 0.0 for k in ("clean", key))
            mine = runs_df[(runs_df["method"] == row["method"]) & (runs_df["arch"] == row["arch"]) & (runs_df["dataset"] == ds)]
            ax.scatter(100 * mine["clean"], 100 * mine[key], s=12, color=colors[row["method"]], alpha=0.35, linewidths=0)
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", ms=8, capsize=3,
                        color=colors[row["method"]], mfc=colors[row["method"]] if key == "aa" else "white",
                        label=_label(row, multi))
            pts.append((x, y))
        front = sorted(p for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts))
        if len(front) > 1:
            ax.plot(*zip(*front), ls="--", color="grey", lw=1, label="Pareto front")
        ax.set_title(ds)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if not fallback:
        note = "Robust accuracy is AutoAttack"
    elif (table["aa_n"] > 0).any():
        note = "Robust accuracy is AutoAttack, PGD-20 for the hollow markers (their runs have no AutoAttack result)"
    else:
        note = "Robust accuracy is PGD-20: no run has an AutoAttack result"
    return True, note + "; small dots: single runs, error bars: std."


def plot_diagnostics(diag, colors: dict, path: Path) -> bool:
    """One panel per diagnostic metric, one line per group (mean over runs, band ± std)."""
    import matplotlib.pyplot as plt

    if diag.empty:
        return False
    from matplotlib.ticker import MaxNLocator

    metrics = sorted(diag["metric"].unique())
    multi = diag[["arch", "dataset"]].drop_duplicates().shape[0] > 1
    fig, axes = _panels(plt, len(metrics), height=4.2)
    for ax, metric in zip(axes, metrics):
        for (method, arch, dataset), g in diag[diag["metric"] == metric].groupby(GROUP):
            g = g.sort_values("epoch")
            label = f"{method} ({arch}, {dataset})" if multi else method
            std = g["std"].fillna(0.0)
            ax.plot(g["epoch"], 100 * g["mean"], marker="o", ms=3, color=colors[method], label=label)
            ax.fill_between(g["epoch"], 100 * (g["mean"] - std), 100 * (g["mean"] + std), color=colors[method], alpha=0.15)
        ax.set_title(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(out: Path, runs_df, table, diag_raw, source: str, trials: bool = False,
                  left_out: str = "") -> list[Path]:
    """Every output file, written into a temporary folder first and moved into ``out`` at the end."""
    import matplotlib

    matplotlib.use("Agg")
    diag = diagnostics_summary(diag_raw)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".report-") as tmp:
        tmp = Path(tmp)
        for name, df in (("table", table), ("runs", runs_df), ("diagnostics", diag)):
            df.to_csv(tmp / f"{name}.csv", index=False)
            df.to_parquet(tmp / f"{name}.parquet", engine="pyarrow", index=False)
        colors = method_colors(runs_df)
        has_pareto, note = plot_pareto(table, runs_df, colors, tmp / "pareto.png")
        has_diag = plot_diagnostics(diag, colors, tmp / "diagnostics.png")
        plots = {"pareto": "pareto.png" if has_pareto else None, "diagnostics": "diagnostics.png" if has_diag else None}
        (tmp / "report.md").write_text(markdown(table, source, len(runs_df), plots, note, trials, left_out))
        written = []
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            written.append(out / f.name)
    for name in ("pareto.png", "diagnostics.png"):  # a plot of an earlier report that has no data now
        if out / name not in written:
            (out / name).unlink(missing_ok=True)
    return written


def log_outputs(uri: str, experiment: str, parent: str | None, files: list[Path]) -> str:
    """Log the outputs under ``report/`` of the parent run, else of a new run tagged raydistill.kind=report."""
    run_id = parent or tracking.open_run(uri, experiment, f"report-{time.strftime('%Y%m%d-%H%M%S')}",
                                         tracking.KIND_REPORT, reuse=False)
    tracking.log_artifacts(uri, run_id, files, "report")
    if parent is None:
        tracking.close_run(uri, run_id, "FINISHED")
    return run_id


# ============================================================================= command
def check_out_dir(path: str) -> Path:
    out = Path(path).expanduser().resolve()
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"--out {path}: cannot write there ({existing} is not a writable folder)")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    plugins.use(args.plugin)
    remote = storage.is_remote(args.out)  # s3://, gs://: written here, then uploaded
    out = Path(tempfile.mkdtemp(prefix="raydistill-report-")) if remote else check_out_dir(args.out)
    uri = tracking.open_store(args.tracking_uri)
    tracking.existing_experiment(uri, args.experiment)
    parent = find_parent(uri, args.experiment, args.parent_run_id, args.search)
    runs = tracking.find_runs(uri, args.experiment, kind=tracking.KIND_RUN, parent=parent)  # no searches, no reports
    where = f"experiment '{args.experiment}'" + (f", search {args.search!r}" if args.search else
                                                  f", children of run {parent}" if parent else "")
    if not runs:
        raise UsageError(f"no training runs found in {where} at {uri}")
    import pandas as pd

    trials = parent is not None  # a search's children: its trials
    left_out = ""
    if not trials:  # final runs only: a search's trials are no seeds, a study's teachers no rows of its table
        searches = {r.info.run_id for r in tracking.find_runs(uri, args.experiment, kind=tracking.KIND_SEARCH)}
        roles = [role(r, searches) for r in runs]
        n_trials, n_teachers = roles.count("trial"), roles.count("teacher")
        runs = [r for r, k in zip(runs, roles) if k == "final"]
        if n_trials or n_teachers:
            left_out = (f"Not in the table: {n_trials} search trial(s) (`--search NAME` tabulates a search's trials) "
                        f"and {n_teachers} study teacher(s).")
        if not runs:
            raise UsageError(f"no final training runs in {where} at {uri}, only {n_trials} search trial(s): "
                             "give --search NAME to tabulate a search's trials")
    runs_df = pd.DataFrame([run_row(r) for r in runs])
    table = summarise(runs_df)
    files = write_outputs(out, runs_df, table, pd.DataFrame(diagnostics_rows(uri, runs)), f"MLflow {uri}, {where}",
                          trials, left_out)
    print((out / "report.md").read_text())
    if remote:
        for f in files:
            storage.upload(f, storage.join(args.out, f.name))
    print(f"[raydistill] report written to {args.out if remote else out} ({', '.join(f.name for f in files)})")
    if args.log_to_mlflow:
        run_id = log_outputs(uri, args.experiment, parent, files)
        print(f"[raydistill] logged as artifacts report/ of MLflow run {run_id}")
    return 0


def _number(text: str | None, default: float) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


run = cli_entry(main)

if __name__ == "__main__":
    run()
