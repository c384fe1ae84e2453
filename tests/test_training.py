"""End-to-end training runs on digits, as a user runs them (subprocess, real Ray, real MLflow)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import assert_one_error_line, cli, error_lines, run_args, summary, train_with_hooks
from loop_hooks import KillOnce, WeightDigests
from raydistill.engine import WORKER_SWITCH_INTERVAL_S

pytestmark = pytest.mark.slow


def history(workdir, run_id: str, key: str = "val/pgd10_acc") -> list[int]:
    c = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def test_pgd_at_on_two_workers_beats_natural_and_keeps_ranks_identical(workdir):
    """Issue 3's acceptance run: PGD-AT under DDP on 2 CPU workers (gloo)."""
    nat = cli("train", "natural", "--preset", "quickstart", "--workers", "0", *run_args(workdir, "nat"))
    assert nat.returncode == 0, nat.stderr[-3000:]
    adv = train_with_hooks([WeightDigests(workdir / "dump")], "pgd_at", "--preset", "quickstart", "--workers", "2",
                           *run_args(workdir, "adv"))
    assert adv.returncode == 0, adv.stderr[-3000:]
    n, a = summary(workdir, "nat")["metrics"], summary(workdir, "adv")
    print(f"natural: {n}\npgd_at (2 workers): {a['metrics']} in {a['wall_time_s']}s")
    assert a["metrics"]["clean_acc"] >= 0.80
    assert a["metrics"]["pgd20_acc"] >= n["pgd20_acc"] + 0.30
    assert a["epochs_completed"] == 8 and history(workdir, a["mlflow_run_id"]) == list(range(8))
    r0, r1 = (json.loads((workdir / "dump" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["ddp"]["student"] == "DistributedDataParallel"
    assert r0["switch_interval_s"] == r1["switch_interval_s"] == pytest.approx(WORKER_SWITCH_INTERVAL_S)  # train_worker
    assert r0["nice"] == r1["nice"] == 0  # not Ray's worker_niceness of 15 (train.init_ray)
    assert r0["student"] == r1["student"] and r0["student.buffers"] == r1["student.buffers"]
    assert "epoch 8/8" in adv.stdout + adv.stderr
    assert not error_lines(adv.stdout + adv.stderr), error_lines(adv.stdout + adv.stderr)  # quiet: a healthy run


def test_killed_worker_is_restarted_and_nothing_is_lost(workdir):
    """Two faults in one run of 3 epochs on 2 workers: rank 1 dies halfway through epoch 1 (the
    group restarts from the epoch-0 checkpoint), then rank 0 dies right after reporting epoch 1's
    checkpoint, before Ray's controller (which polls every 2 s) can have registered it: the group
    must resume from that persisted checkpoint, not redo the epoch, and log each epoch once."""
    mid, after_report = workdir / "killed_mid_epoch", workdir / "killed_after_report"
    faults = [KillOnce("mid_epoch", 1, 1, mid), KillOnce("after_report", 1, 0, after_report)]
    proc = train_with_hooks(faults, "pgd_at", "--dataset", "digits", "--workers", "2", "--epochs", "3",
                            "--max-failures", "2", *run_args(workdir, "kill"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert mid.exists() and after_report.exists(), "a worker was never killed"
    out = proc.stdout + proc.stderr
    s = summary(workdir, "kill")
    assert s["epochs_completed"] == 3
    assert history(workdir, s["mlflow_run_id"]) == [0, 1, 2]  # no epoch missing or repeated
    assert history(workdir, s["mlflow_run_id"], "train/loss_ce") == [0, 1, 2]
    assert "resumed from epoch 1" in out and "resumed from epoch 2" in out, out[-3000:]


def test_in_process_and_one_ray_worker_give_identical_metrics(workdir):
    common = ["natural", "--dataset", "digits", "--epochs", "2", "--seed", "3"]
    a = cli("train", *common, "--workers", "0", *run_args(workdir, "local"))
    b = cli("train", *common, "--workers", "1", *run_args(workdir, "ray1"))
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])
    assert summary(workdir, "local")["metrics"] == summary(workdir, "ray1")["metrics"]
    c = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    ids = [summary(workdir, n)["mlflow_run_id"] for n in ("local", "ray1")]
    for key in ("val/clean_acc", "val/pgd10_acc", "train/loss_ce"):
        h = [[m.value for m in sorted(c.get_metric_history(i, key), key=lambda m: m.step)] for i in ids]
        assert h[0] == h[1], key


def test_relaunch_with_same_name_resumes_in_process(workdir):
    first = cli("train", "natural", "--dataset", "digits", "--workers", "0", "--epochs", "2", *run_args(workdir, "r"))
    assert first.returncode == 0, first.stderr[-2000:]
    again = cli("train", "natural", "--dataset", "digits", "--workers", "0", "--epochs", "3", *run_args(workdir, "r"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from epoch 2" in again.stdout
    s = summary(workdir, "r")
    assert s["epochs_completed"] == 3 and history(workdir, s["mlflow_run_id"]) == [0, 1, 2]
    c = MlflowClient(f"sqlite:///{workdir}/mlflow.db")  # each launch logged its best checkpoint as the run's model
    models = c.search_logged_models(experiment_ids=[c.get_run(s["mlflow_run_id"]).info.experiment_id])
    assert [m.name for m in models] == ["model", "model"] and {m.source_run_id for m in models} == {s["mlflow_run_id"]}
    assert (Path(models[0].artifact_location) / "extra_files" / "model.pt").read_bytes() == \
        (Path(s["checkpoint"]) / "model.pt").read_bytes()  # the newest, which runs:/<id>/model names: the last best
    ev = cli("evaluate", s["checkpoint"], "--attacks", "clean", "--summary-json", str(workdir / "ev.json"))
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((workdir / "ev.json").read_text())["metrics"]["clean_acc"] == pytest.approx(
        s["metrics"]["clean_acc"])


def test_relaunch_under_ray_with_another_worker_count_resumes(workdir):
    """A Ray run of 2 epochs on 2 workers, relaunched with the same --name on 1 worker for 3 epochs:
    it continues from Ray's registered checkpoint of epoch 2 (the run's storage is the same), trains
    epoch 3 only, and MLflow holds each epoch once in the same run."""
    common = ["pgd_at", "--dataset", "digits", "--test-attacks", "clean"]
    first = cli("train", *common, "--workers", "2", "--epochs", "2", *run_args(workdir, "w"))
    assert first.returncode == 0, first.stderr[-3000:]
    first_run = summary(workdir, "w")["mlflow_run_id"]
    again = cli("train", *common, "--workers", "1", "--epochs", "3", *run_args(workdir, "w"))
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "resumed from epoch 2" in out and "epoch 1/3" not in out and "epoch 3/3" in out, out[-3000:]
    s = summary(workdir, "w")
    assert s["epochs_completed"] == 3 and s["mlflow_run_id"] == first_run
    assert s["checkpoint"].endswith("checkpoint_000003")
    assert history(workdir, s["mlflow_run_id"]) == [0, 1, 2]


@pytest.mark.parametrize("argv,needle", [
    (["nosuch"], "unknown method 'nosuch'"),
    (["natural", "--workers", "-1"], "--workers"),
    (["natural", "--epochs", "-1"], "--epochs"),
    (["natural", "--epochs", "0"], "--epochs"),
    (["trades", "--set", "gamma=1"], "no hyperparameter 'gamma'"),
    (["trades", "--set", "beta=lots"], "beta='lots'"),
    (["pgd_at", "--set", "bn_mode=3"], "must be one of eval, train"),
])
def test_bad_train_input_is_one_error_line_and_no_mlflow_run(workdir, argv, needle):
    proc = cli("train", *argv, "--dataset", "digits", *run_args(workdir, "bad"), timeout=120)
    assert_one_error_line(proc, needle)
    assert not (workdir / "mlflow.db").exists() and not any((workdir / "runs").iterdir())


ONLINE = {  # method: (its trained networks, an MLflow metric only it logs); AKA with 4 SVGD steps to keep it short
    "peeraid": (["student", "peer"], ["val/peer_acc_on_student_adv", "val/peer_acc_on_own_adv", "train/loss_peer_ce"]),
    "at_aka": (["student", "teacher0", "teacher1", "teacher2"], ["val/svgd_pairwise_linf", "val/pgd_pairwise_linf"]),
    "cat_aka": (["student0", "student1", "student2"], ["val/student0_pgd10_acc", "val/selected_student"]),
}


@pytest.mark.parametrize("method", sorted(ONLINE))
def test_online_method_on_two_workers_keeps_every_network_identical_across_ranks(workdir, method):
    """Each online method under TorchTrainer on 2 CPU workers: every trained network under DDP and,
    after the run's steps, identical (parameters and BatchNorm buffers) on both ranks."""
    nets, metrics = ONLINE[method]
    extra = ["--set", "svgd_steps=4"] if method != "peeraid" else []
    proc = train_with_hooks([WeightDigests(workdir / "dump")], method, "--dataset", "digits", "--workers",
                            "2", "--epochs", "1", *extra, *run_args(workdir, method))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((workdir / "dump" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["ddp"] == r1["ddp"] == {n: "DistributedDataParallel" for n in nets}
    for net in nets + [f"{n}.buffers" for n in nets]:
        assert r0[net] == r1[net], net
    c = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    logged = c.get_run(summary(workdir, method)["mlflow_run_id"]).data.metrics
    assert set(metrics) <= set(logged), logged
