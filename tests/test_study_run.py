"""A study end to end from the command line, run whole and run killed in each of its stages (search, final,
evaluation) and relaunched: the same table, every trial, final run and evaluation exactly once in MLflow and the
records, the summary JSON of CONTRACT.md, the report."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, error_lines


TINY = """\
study: tiny
dataset: digits
student: small_cnn
train: {preset: quickstart, workers: 1}
methods: [natural, pgd_at]
search:
  budget: {trial_epochs: 2}    # 2 trials of 1 epoch, at once
  epochs: 1
  scheduler: none
  max_concurrent: 2
final:
  seeds: [0, 1]
  schedule: {epochs: 1, lr_milestones: []}
evaluation:
  attacks: [clean, pgd20, aa]
  n_examples: 8
  batch_size: 8
"""


def study_cmd(workdir, *extra: str) -> list[str]:
    if not (workdir / "tiny.yaml").exists():
        workdir.mkdir(exist_ok=True)
        (workdir / "tiny.yaml").write_text(TINY)
    return [sys.executable, "-m", "raydistill.study", str(workdir / "tiny.yaml"), "--storage-path",
            str(workdir / "runs"), "--tracking-uri", f"sqlite:///{workdir}/mlflow.db", "--name", "tiny",
            "--summary-json", str(workdir / "study.json"), *extra]


def runs_of(workdir) -> list:
    c = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = c.get_experiment_by_name("raydistill")
    return c.search_runs([exp.experiment_id], max_results=1000) if exp else []


def test_report_table_final_runs_only_with_published_figures_and_aa_test(tmp_path):
    """The table from records (no Ray): mean ± std over seeds, n, the budget used, the published row beside."""
    from raydistill.study import load_study
    from raydistill.study import table

    plan = load_study(str(REPO / "studies" / "cifar10-resnet18.yaml"))
    aa = {"pgd_at": [0.46, 0.47, 0.465], "trades": [0.49, 0.495, 0.50]}
    searches, finals, evals = {}, {}, {}
    for m in plan.spec.methods:
        searches[f"search/{m.name}"] = {"best_params": {"lr": 0.1}, "trials": 5, "trial_epochs": 40,
                                       "budget_trial_epochs": 40, "device_hours": 1.0, "mlflow_run_id": "s"}
        for i, seed in enumerate(plan.spec.final.seeds):
            finals[f"final/{m.name}/seed{seed}"] = {"mlflow_run_id": f"{m.name}{seed}", "checkpoint": "c",
                                                    "device_hours": 0.5}
            evals[f"eval/{m.name}/seed{seed}"] = {"n_examples": 10000, "metrics": {
                "clean_acc": 0.8, "pgd20_acc": 0.5, "aa_acc": aa.get(m.name, [0.40, 0.41, 0.42])[i]}}
    methods = table.aggregate(plan, searches, evals, finals)
    assert methods["trades"]["n"] == 3 and abs(methods["trades"]["mean"]["aa_acc"] - 0.495) < 1e-9
    best, tests = table.aa_tests(methods)
    assert best == "trades" and tests["pgd_at"]["differs"] and tests["pgd_at"]["p"] < 0.05
    text = table.markdown(plan, methods, {"search": 1.0, "final": 2.0}, 10000)
    row = next(ln for ln in text.splitlines() if ln.startswith("| trades | resnet18 |"))
    assert "49.50 ± 0.50" in row and "| 3 | 5 | 40 (40) | best |" in row
    # the published row names its setting: PeerAiD's baselines "following their original settings" (not stated: ‡)
    assert "Jung et al., CVPR 2024 T1 [setting not stated (Sec. 4.1)]‡: Clean 81.47 (-1.47)" in row
    assert "AA 49.35 (+0.15)" in row and "‡ trades: Jung et al., CVPR 2024, Table 1 does not state" in text
    assert "same first 10000 test images" in text and "| final | 2.0000 |" in text
    assert "Guidance diagnostics" not in text
    assert "![diagnostics](diagnostics.png)" in table.markdown(plan, methods, {}, 10000, diagnostics=True)


def kill_when(workdir, ready, what: str, *extra: str) -> str:
    """Launch the study (``extra``: --resume) and SIGKILL the whole job (driver and its local Ray) once
    ``ready()`` holds; returns its output."""
    proc = subprocess.Popen(study_cmd(workdir, *extra), cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and not ready():
            assert proc.poll() is None, f"the study ended before it was killed in its {what}: " + proc.stdout.read()[-3000:]
            time.sleep(0.5)
        assert time.time() < deadline, f"never reached its {what}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
    return out


def figures(workdir) -> dict:
    """The study's table as figures: per method its best values, per seed its test figures, mean and std."""
    s = json.loads((workdir / "study.json").read_text())
    return {m: (v["best_params"], [(f["seed"], f["metrics"]) for f in v["final"]], v["mean"], v["std"])
            for m, v in s["methods"].items()}


def test_report_diagnostics_of_the_final_runs(tmp_path):
    """The study's diagnostics.png: the final runs' per-epoch guidance diagnostics (none: no plot)."""
    import matplotlib.image as mpimg
    from test_report import make_run

    from raydistill.study.runner import diagnostics_plot

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("raydistill")
    finals = {f"final/peeraid/seed{s}": {"mlflow_run_id": make_run(
        c, exp, "peeraid", "small_cnn", s, {"clean": 0.9}, diagnostics={"val/peer_acc_on_student_adv": [0.5, 0.6 + s / 10]})}
        for s in (0, 1)}
    finals["final/pgd_at/seed0"] = {"mlflow_run_id": make_run(c, exp, "pgd_at", "small_cnn", 0, {"clean": 0.9})}
    assert diagnostics_plot(uri, finals, str(tmp_path / "d.png"))
    img = mpimg.imread(tmp_path / "d.png")
    assert img.shape[0] > 300 and img[..., :3].std() > 0.05
    assert not diagnostics_plot(uri, {"final/pgd_at/seed0": finals["final/pgd_at/seed0"]}, str(tmp_path / "e.png"))
    assert not (tmp_path / "e.png").exists()


@pytest.mark.slow
def test_study_killed_in_each_stage_completes_once_with_the_table_of_an_uninterrupted_study(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    t0 = time.time()
    done = subprocess.run(study_cmd(whole), cwd=str(REPO), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    t_whole = time.time() - t0
    assert "Trial status" not in done.stdout and "Configuration for experiment" not in done.stdout  # no Tune tables
    assert "| natural | small_cnn |" in done.stdout and "| pgd_at | small_cnn |" in done.stdout  # the table, printed
    assert "then http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning" in done.stdout  # the UI on its runs
    # each search ranks by its method's selection: natural by clean accuracy
    assert "search/natural: done: 2 trials, 2 of 2 trial-epochs, best trial " in done.stdout
    assert re.search(r"search/natural: done: .*\(val/clean_acc 0\.\d+\)", done.stdout), done.stdout[-3000:]
    assert re.search(r"search/pgd_at: done: .*\(val/pgd10_acc 0\.\d+\)", done.stdout), done.stdout[-3000:]
    assert not error_lines(done.stdout + done.stderr), error_lines(done.stdout + done.stderr)

    records = cut / "runs" / "tiny" / "records"
    count = lambda stage: len(list((records / stage).rglob("*.json"))) if (records / stage).exists() else 0  # noqa: E731

    def in_second_search():  # the natural search recorded, pgd_at's trials under way (Tune saves its state every few s)
        if not (records / "search" / "natural.json").exists():
            return False
        try:
            runs = runs_of(cut)
        except Exception:  # the driver may be creating the store
            return False
        return any(r.data.tags.get("method") == "pgd_at" and r.data.tags.get("raydistill.kind") == "run" for r in runs)

    t0 = time.time()
    outs = [kill_when(cut, lambda: in_second_search() and time.sleep(12) is None, "search")]
    assert not (records / "search" / "pgd_at.json").exists(), outs[-1][-3000:]
    outs.append(kill_when(cut, lambda: 1 <= count("final"), "final", "--resume"))
    assert count("final") < 4 and count("eval") == 0, outs[-1][-3000:]
    outs.append(kill_when(cut, lambda: 1 <= count("eval"), "evaluation", "--resume"))
    assert count("eval") < 4, outs[-1][-3000:]
    last = subprocess.run(study_cmd(cut, "--resume"), cwd=str(REPO), capture_output=True, text=True, timeout=900)
    out = last.stdout + last.stderr
    assert last.returncode == 0, (outs, out[-4000:])
    print(f"study: uninterrupted {t_whole:.0f}s; killed in search, final and evaluation and relaunched: "
          f"{time.time() - t0:.0f}s in all")
    assert "search/pgd_at: continuing the interrupted search" in outs[1] and "search/natural: recorded" in outs[1]
    assert "eval/natural/seed0" in out or "eval/natural/seed1" in out or "eval/pgd_at" in out
    assert not error_lines(out), error_lines(out)
    assert figures(cut) == figures(whole)  # the same table, figure by figure

    # the summary JSON (CONTRACT.md)
    s = json.loads((cut / "study.json").read_text())
    assert s["study"] == "tiny" and s["mlflow_run_id"] and s["report"].endswith("report.md")
    assert set(s["methods"]) == {"natural", "pgd_at"}
    for m, v in s["methods"].items():
        assert v["best_params"] and v["search"]["trials"] == 2 and v["search"]["trial_epochs"] == 2
        assert v["search"]["device_hours"] > 0
        assert [f["seed"] for f in v["final"]] == [0, 1]
        for f in v["final"]:
            assert f["mlflow_run_id"] and f["checkpoint"] and f["n_examples"] == 8
            assert set(f["metrics"]) == {"clean_acc", "pgd20_acc", "aa_acc"}
        assert set(v["mean"]) == set(v["std"]) == {"clean_acc", "pgd20_acc", "aa_acc"}
    report = (cut / "runs" / "tiny" / "report.md").read_text()
    assert "| natural | small_cnn |" in report and "| pgd_at | small_cnn |" in report and "±" in report
    assert (cut / "runs" / "tiny" / "pareto.png").stat().st_size > 1000

    # MLflow: every trial, final run and evaluation exactly once, all FINISHED, under the study's runs
    runs = runs_of(cut)
    by_id = {r.info.run_id: r for r in runs}
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), sorted(names)
    assert len(runs) == len(runs_of(whole))
    study = [r for r in runs if r.data.tags.get("raydistill.kind") == "study"]
    assert len(study) == 1 and study[0].info.run_id == s["mlflow_run_id"]
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    exp = MlflowClient(f"sqlite:///{cut}/mlflow.db").get_experiment_by_name("raydistill")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"

    def parent(r):
        return by_id[r.data.tags["mlflow.parentRunId"]]

    stages = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("raydistill.kind") == "stage"}
    assert set(stages) == {"search", "final", "evaluation", "report"}
    assert all(parent(r).info.run_id == s["mlflow_run_id"] for r in stages.values())
    for m, v in s["methods"].items():
        trials = [r for r in runs if r.data.tags.get("stage") == "search" and r.data.tags.get("method") == m
                  and r.data.tags.get("raydistill.kind") == "run"]
        assert len(trials) == 2 and {parent(t).info.run_id for t in trials} == {v["search"]["mlflow_run_id"]}
        assert all(t.data.tags["is_final"] == "false" and t.data.tags["study"] == "tiny" for t in trials)
        for f in v["final"]:
            run = by_id[f["mlflow_run_id"]]
            assert run.data.tags["is_final"] == "true" and run.data.tags["method"] == m
            assert run.data.tags["seed"] == str(f["seed"]) and parent(run).info.run_id == stages["final"].info.run_id
            assert "study/aa_acc" in run.data.metrics
            ev = by_id[f["evaluation_run_id"]]
            assert ev.data.metrics["test/aa_acc"] == f["metrics"]["aa_acc"]
    finals = [r for r in runs if r.data.tags.get("is_final") == "true"]
    assert len(finals) == 4
    assert len(list(records.rglob("*.json"))) == 2 + 4 + 4

    # the Model Registry: each method's best final model (by the study's AA) as version 1 of tiny-<method>
    c = MlflowClient(f"sqlite:///{cut}/mlflow.db")
    for m, v in s["methods"].items():
        assert v["registered_model"] == f"models:/tiny-{m}/1"
        (version,) = c.search_model_versions(f"name = 'tiny-{m}'")
        best = max(v["final"], key=lambda f: f["metrics"]["aa_acc"])
        assert version.run_id in {f["mlflow_run_id"] for f in v["final"]}
        assert version.tags["method"] == m and version.tags["selected_by"] == "aa_acc"
        assert version.tags["aa_acc"] == f"{best['metrics']['aa_acc']:.4f}"
        chosen = next(f for f in v["final"] if f["mlflow_run_id"] == version.run_id)
        assert version.tags["seed"] == str(chosen["seed"]) and chosen["metrics"]["aa_acc"] == best["metrics"]["aa_acc"]
        assert version.tags["pgd20_acc"] == f"{chosen['metrics']['pgd20_acc']:.4f}"
    assert "registered models: models:/tiny-natural/1, models:/tiny-pgd_at/1" in out

    # a relaunch of the finished study redoes nothing
    again = subprocess.run(study_cmd(cut, "--resume"), cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "started" not in again.stdout and len(runs_of(cut)) == len(runs)
    assert len(c.search_model_versions("name = 'tiny-pgd_at'")) == 1  # registered once
