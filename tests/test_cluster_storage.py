"""Remote storage end to end on a real 2-node Ray cluster (two `ray start` processes on this machine) with moto's
S3 server on 127.0.0.1 as the shared storage: train (one worker on each node, a worker killed between its
checkpoint's upload and Ray's registration of it), evaluate and an offline method's --teacher reading the result
from s3://, and a node-local storage path refused before anything runs. A search on S3 with AutoAttack of its best
trial's s3:// checkpoint, and storage the nodes cannot open: tests/test_job_submit.py, on clusters/local.sh."""
from __future__ import annotations

import json
import re
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, assert_one_error_line, cli, train_with_hooks
from loop_hooks import KillOnce, NodeIds

pytestmark = pytest.mark.slow
QUICK = ["--preset", "quickstart", "--val-size", "100"]


@pytest.fixture
def cluster(cluster2):
    """The session's 2-node cluster (1 CPU per node) and S3 server (tests/conftest.py): (ray, s3, work)."""
    return cluster2.ray, cluster2.s3, cluster2.work


def mlflow_uri(work) -> str:
    return f"sqlite:///{work}/mlflow.db"


def test_train_on_s3_with_a_worker_on_each_node_then_evaluate_and_distill_from_it(cluster):
    ray, s3, work = cluster
    storage = s3.uri("runs")
    t0 = time.time()
    # rank 0 dies right after epoch 2's checkpoint is uploaded, before Ray registers it: Ray restarts the
    # group, which resumes from that folder; Ray's own retention never sees it
    proc = train_with_hooks([KillOnce("after_report", 1, 0, work / "killed"), NodeIds(work / "nodes")],
                            "pgd_at", *QUICK, "--epochs", "3", "--workers", "2", "--cpus-per-worker", "1",
                            "--max-failures", "1", "--storage-path", storage, "--name", "s3run",
                            "--tracking-uri", mlflow_uri(work), "--summary-json", str(work / "s3run.json"), env=ray.env)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (work / "killed").exists(), "the fault never fired"
    nodes = {p.name: p.read_text() for p in (work / "nodes").iterdir()}
    assert len(nodes) == 2 and len(set(nodes.values())) == 2, f"both workers on one node: {nodes}"
    s = json.loads((work / "s3run.json").read_text())
    print(f"2-node train on S3: {wall:.1f}s wall, workers on nodes {sorted(set(nodes.values()))}")
    assert s["epochs_completed"] == 3 and s["metrics"]["clean_acc"] > 0.5
    assert s["checkpoint"].startswith("s3://raydistill/runs/s3run/checkpoint_"), s["checkpoint"]
    # exactly the newest 2 checkpoint folders are left in the bucket (also the one Ray never registered)
    folders = [n for n in s3.listdir("runs", "s3run") if re.fullmatch(r"checkpoint_\d{6}", n)]
    assert folders == ["checkpoint_000002", "checkpoint_000003"], folders
    # MLflow received the best and last student from S3
    c = MlflowClient(mlflow_uri(work))
    arts = {a.path for d in ("checkpoints/best", "checkpoints/last") for a in c.list_artifacts(s["mlflow_run_id"], d)}
    assert arts == {"checkpoints/best/model.pt", "checkpoints/last/last_model.pt"}, arts
    assert c.get_run(s["mlflow_run_id"]).info.status == "FINISHED"

    # evaluate reads the checkpoint from S3 (the driver's environment has the endpoint)
    ev = cli("evaluate", s["checkpoint"], "--attacks", "clean,pgd20", "--n-examples", "100", "-q",
             "--summary-json", str(work / "eval.json"), env=ray.env, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    e = json.loads((work / "eval.json").read_text())
    assert e["checkpoint"] == s["checkpoint"] and e["metrics"]["clean_acc"] > 0.5

    # an offline method distils from the S3 teacher (read by the driver's check and by the worker)
    ard = cli("train", "ard", *QUICK, "--epochs", "1", "--workers", "1", "--teacher", s["checkpoint"],
              "--storage-path", storage, "--name", "ard-from-s3", "--tracking-uri", "none",
              "--summary-json", str(work / "ard.json"), env=ray.env, timeout=600)
    assert ard.returncode == 0, ard.stdout[-2000:] + ard.stderr[-2000:]
    assert json.loads((work / "ard.json").read_text())["checkpoint"].startswith("s3://raydistill/runs/ard-from-s3/")


def test_a_node_local_storage_path_is_refused_on_a_cluster_of_several_nodes(cluster, tmp_path):
    ray, _, _ = cluster
    for cmd in (["train", "pgd_at"], ["tune", "pgd_at", "--num-samples", "1", "--grace-period", "1"]):
        proc = cli(*cmd, *QUICK, "--epochs", "1", "--storage-path", str(tmp_path / "runs"),
                   "--tracking-uri", "none" if cmd[0] == "train" else f"sqlite:///{tmp_path}/m.db",
                   env=ray.env, timeout=300)
        assert_one_error_line(proc, "shared storage", "s3://", "2 nodes")
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint_*"))



def test_evaluation_sharded_over_both_nodes_equals_one_worker_and_resumes_after_a_kill(cluster, tmp_path):
    """evaluate --workers 2 (spread: one worker per node) gives every image the same results
    as --workers 1, AutoAttack included; its per-image results go to S3 as each batch finishes, so a driver killed
    mid-way (SIGKILL: its Ray workers die with it) is continued by the same command, no batch attacked twice."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    ray, s3, work = cluster
    ck = tmp_path / "ck"
    proc = cli("train", "pgd_at", *QUICK, "--epochs", "4", "--workers", "0", "--tracking-uri", "none",
               "--storage-path", str(ck), "--name", "m", "--summary-json", str(ck / "s.json"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = json.loads((ck / "s.json").read_text())["checkpoint"]
    args = ["evaluate", ckpt, "--attacks", "clean,pgd20,aa", "--n-examples", "32", "--batch-size", "16",
            "--storage-path", s3.uri("evals"), "--cpus-per-worker", "1"]  # this machine has 2 cores for 2 nodes
    fs = s3.filesystem()

    def table(name: str, what: str = "per_image.parquet"):
        return pq.read_table(f"raydistill/evals/evaluations/{name}/{what}", filesystem=fs)

    def units(name: str):
        import pyarrow as pa

        return pa.concat_tables([table(name, f"units/{a}/{f}").select(["index", "launch", "worker"])
                                 for a in ("clean", "pgd20", "aa")
                                 for f in s3.listdir("evals", "evaluations", name, "units", a)])

    t0 = time.time()
    one = cli(*args, "--workers", "1", "--name", "one", env=ray.env, timeout=900)
    t1 = time.time()
    two = cli(*args, "--workers", "2", "--name", "two", env=ray.env, timeout=900)
    t2 = time.time()
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    print(f"sharded evaluation (clean, pgd20, aa on 32 images): 1 worker {t1 - t0:.1f}s, 2 workers {t2 - t1:.1f}s")
    assert table("one").equals(table("two"))  # image by image, AutoAttack's component per image included
    assert len({w.split("/")[0] for w in units("two").column("worker").to_pylist()}) == 2  # both nodes attacked

    # killed once 2 of its 6 (attack, batch) units are stored, then relaunched
    cmd = [sys.executable, "-m", "raydistill.evaluate", *args[1:], "--workers", "2", "--name", "cut"]
    driver = subprocess.Popen(cmd, env={**ray.env}, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None:
        stored = sum(len(s3.listdir("evals", "evaluations", "cut", "units", a)) for a in ("clean", "pgd20", "aa"))
        if stored >= 2:
            break
        time.sleep(0.5)
    assert driver.poll() is None, "the evaluation ended before it could be killed"
    driver.kill()
    driver.wait()
    before = units("cut")
    again = cli(*args, "--workers", "2", "--name", "cut", env=ray.env, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    done = len({(w, i) for w, i in zip(before.column("launch").to_pylist(), before.column("index").to_pylist())})
    assert f"resuming {s3.uri('evals')}/evaluations/cut: " in again.stderr and " of 6 (attack, batch) units already done" in again.stderr
    after = units("cut")
    assert sorted(after.column("index").to_pylist()) == sorted(list(range(32)) * 3)  # each image once per attack
    assert len(set(after.column("launch").to_pylist())) == 2 and done >= 2 * 16
    assert table("cut").equals(table("two"))
