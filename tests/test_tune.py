"""Hyperparameter search end to end: Ray Tune + Optuna + ASHA over TorchTrainer trials, MLflow runs."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from cluster import _descendants
from conftest import REPO, assert_one_error_line, cli, warning_lines

pytestmark = pytest.mark.slow


def tune_args(workdir, name: str) -> list[str]:
    return ["--storage-path", str(workdir / "runs"), "--tracking-uri", f"sqlite:///{workdir}/mlflow.db",
            "--name", name, "--summary-json", str(workdir / f"{name}.json")]


def children(workdir, parent: str) -> list:
    c = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = c.get_experiment_by_name("raydistill")
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def test_quickstart_search_for_peeraid_makes_a_child_run_per_trial(workdir):
    """The quickstart as a new user runs it (`python -m raydistill.quickstart` in a fresh folder: MLflow's ./mlflow.db,
    tune peeraid --preset quickstart): at most 80 lines, one per trial event, none at warning or error level."""
    t0 = time.time()
    # 4 trials of at most 4 epochs (the quickstart's 8 of 8: the same path, half of it twice over)
    proc = subprocess.run([sys.executable, "-m", "raydistill.quickstart", "--storage-path", str(workdir / "runs"),
                           "--name", "q", "--num-samples", "4", "--epochs", "4", "--aa-n-examples", "50"],
                          capture_output=True, text=True, timeout=1200, cwd=str(workdir),
                          env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                               "PYTHONPATH": str(REPO)})
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    lines = out.splitlines()  # blank ones included
    print(f"the quickstart's console ({len(lines)} lines):\n" + "\n".join(lines))
    assert len(lines) <= 80 and not warning_lines(out), (len(lines), warning_lines(out))
    events = [ln for ln in proc.stdout.splitlines() if ln.startswith("[tune ")]
    assert sum(" started: " in ln for ln in events) == 4, events
    assert sum(re.search(r" (finished|stopped by ASHA) after \d of 4 epochs, kept checkpoint's val/pgd10_acc 0\.\d{4}", ln)
               is not None for ln in events) == 4, events
    assert sum(" AutoAttack on trial " in ln for ln in events) == 1, events
    assert "Trial status" not in out and "╭" not in out  # no Tune tables (tune --verbose has them)
    s = json.loads((workdir / "quickstart-summary.json").read_text())
    print(f"quickstart peeraid search: {wall:.0f}s wall, {s['trial_epochs']} trial-epochs, best {s['best']['metrics']}")
    assert s["num_trials"] == 4 and len({t["trial_id"] for t in s["trials"]}) == 4
    runs = children(workdir, s["mlflow_run_id"])
    assert len(runs) == 4 and {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    by_id = {r.info.run_id: r for r in runs}
    for t in s["trials"]:  # the MLflow run says what Tune did with the trial
        run = by_id[t["mlflow_run_id"]]
        want = {"COMPLETED": "FINISHED", "STOPPED": "KILLED"}[t["status"]]
        assert run.info.status == want and "failure_reason" not in run.data.tags, (t, run.info.status, run.data.tags)
        assert (run.data.tags.get("stopped_early") == "asha") == (t["status"] == "STOPPED")
    assert s["best"]["metrics"]["val_best_pgd10_acc"] > 0.3
    assert "test_aa_acc" in s["best"]["metrics"]  # AutoAttack on the top trial, written back to its run
    best_run = next(r for r in runs if r.info.run_id == s["best"]["mlflow_run_id"])
    assert "test/aa_acc" in best_run.data.metrics
    # every figure of the top trial's row from AutoAttack's 50 images; the whole split's kept apart
    assert s["best"]["metrics"]["test_n_examples"] == 50 and best_run.data.metrics["test/n_examples"] == 50
    assert {"test_clean_acc", "test_fgsm_acc", "test_pgd20_acc", "test_worst_acc"} <= set(s["best"]["metrics"])
    assert {"test_all/pgd20_acc", "test/pgd20_acc"} <= set(best_run.data.metrics)
    assert s["best"]["metrics"]["test_worst_acc"] <= s["best"]["metrics"]["test_aa_acc"]
    assert len(s["trials"]) == 4 and all(t["status"] in ("COMPLETED", "STOPPED") for t in s["trials"])
    c = MlflowClient(f"sqlite:///{workdir}/mlflow.db")  # every completed trial's best checkpoint is its run's model
    models = c.search_logged_models(experiment_ids=[best_run.info.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(t["mlflow_run_id"] for t in s["trials"]
                                                             if t["status"] == "COMPLETED")


def test_killed_search_resumes_with_every_trial_exactly_once(workdir):
    args = ["pgd_at", "--dataset", "digits", "--epochs", "2", "--num-samples", "3", "--max-concurrent", "2",
            "--scheduler", "none", "--top-k", "0", *tune_args(workdir, "k")]
    proc = subprocess.Popen([sys.executable, "-m", "raydistill.tune", *args], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    db = workdir / "mlflow.db"
    deadline = time.time() + 600
    try:  # kill the driver once the first trial has finished and others are under way
        while time.time() < deadline:
            if db.exists() and time.time() > deadline - 590:
                try:  # the driver may still be creating the store
                    c = MlflowClient(f"sqlite:///{db}")
                    exp = c.get_experiment_by_name("raydistill")
                    if exp and c.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and tags.`mlflow.parentRunId` != ''"):
                        break
                except Exception:
                    pass
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(2)
        time.sleep(3)
    finally:  # the driver and the local Ray instance it started die at once, as with a crash of the machine's
        left = _descendants(proc.pid)  # user; only this test's processes (never `ray stop`: other Ray instances)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    again = cli("tune", *args, "--resume", timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    s = json.loads((workdir / "k.json").read_text())
    assert s["num_trials"] == 3 and len({t["trial_id"] for t in s["trials"]}) == 3
    assert all(t["status"] == "COMPLETED" and t["epochs_completed"] == 2 for t in s["trials"])
    runs = children(workdir, s["mlflow_run_id"])
    assert len(runs) == 3  # one MLflow run per trial: none lost, none run twice
    c = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    for r in runs:
        assert sorted(m.step for m in c.get_metric_history(r.info.run_id, "val/pgd10_acc")) == [0, 1]


def test_a_trial_whose_loss_turns_infinite_is_stopped_with_its_reason_and_the_search_goes_on(workdir):
    """TRADES with beta = 1e39 overflows float32 in the first step. The seeded random sampler draws
    both values of beta across the three trials (fixed: Optuna's RandomSampler with --seed 0)."""
    space = workdir / "trades_nan.yaml"
    space.write_text("method: trades\nparams:\n  beta: {categorical: [6.0, 1.0e+39]}\n")
    proc = cli("tune", "trades", "--dataset", "digits", "--epochs", "2", "--num-samples", "3", "--max-concurrent", "1",
               "--scheduler", "none", "--search", "random", "--seed", "0", "--top-k", "0",
               "--search-space", str(space), *tune_args(workdir, "nan"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((workdir / "nan.json").read_text())
    by_beta = {}
    for t in s["trials"]:
        by_beta.setdefault(float(t["params"]["beta"]), []).append(t)
    assert set(by_beta) == {6.0, 1e39}, s["trials"]
    runs = {r.info.run_id: r for r in children(workdir, s["mlflow_run_id"])}
    for t in by_beta[1e39]:
        assert t["status"] == "ERROR" and "non-finite" in t["error"], t
        run = runs[t["mlflow_run_id"]]
        assert run.info.status == "FAILED" and "non-finite" in run.data.tags["failure_reason"]
        assert re.search(rf"^\[tune [\d:]+\] trial {t['trial_id']} failed after \d of 2 epochs: .*non-finite", proc.stdout,
                         re.M), proc.stdout[-3000:]  # its console line, with the reason
    for t in by_beta[6.0]:  # the search went on: the other trials trained to the end
        assert t["status"] == "COMPLETED" and t["epochs_completed"] == 2, t
        assert runs[t["mlflow_run_id"]].info.status == "FINISHED"
    assert s["best"]["params"]["beta"] == 6.0


@pytest.mark.parametrize("argv,needle", [
    (["nosuch"], "unknown method 'nosuch'"),
    (["pgd_at", "--objectives", "speed"], "--objectives"),
    (["pgd_at", "--search-space", "/nonexistent.yaml"], "does not exist"),
    (["pgd_at", "--resume"], "no search named"),
    (["pgd_at", "--workers", "0"], "in-process"),
    (["pgd_at", "--epochs", "2", "--grace-period", "5"], "--grace-period 5"),
    (["pgd_at", "--num-samples", "0"], "--num-samples"),
    (["pgd_at", "--top-k", "-1"], "--top-k"),
])
def test_bad_tune_input_is_one_error_line_and_creates_nothing(workdir, argv, needle):
    proc = cli("tune", *argv, "--dataset", "digits", *tune_args(workdir, "bad"), timeout=120)
    assert_one_error_line(proc, needle)
    assert not (workdir / "mlflow.db").exists() and not any((workdir / "runs").iterdir())
