"""The headline use, on a real 2-node cluster on this machine: `clusters/local.sh up` (an S3 server standing in for
the bucket, an MLflow server, a Ray head and a second node, token authentication on), then `clusters/local.sh
submit`, i.e. `ray job submit --working-dir . -- python -m raydistill.tune peeraid --preset quickstart ...` with
neither --tracking-uri nor --storage-path: the job and its workers take both from the environment of `ray start`.
Only what `up` started is stopped (`down`), never another Ray instance."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster import S3Server, free_port
from conftest import REPO, error_lines

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
LOCAL = str(REPO / "clusters" / "local.sh")
# what a shell may carry that the job must not get from it: it takes all of these from `ray start`
SHELL_ONLY = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAYDISTILL_STORAGE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


def local_sh(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([LOCAL, *args], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    # a short state folder: Ray's socket paths under it must stay within 107 characters
    state = Path(tempfile.mkdtemp(prefix="rdl-", dir="/tmp"))
    ports = {k: str(free_port()) for k in ("RAY_PORT", "DASHBOARD_PORT", "MLFLOW_PORT", "S3_PORT")}
    env = {k: v for k, v in os.environ.items() if k not in SHELL_ONLY}
    env.update(ports, RAYDISTILL_LOCAL=str(state), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    up = local_sh(env, "up")
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "2 nodes" in up.stdout
        yield {"env": env, "state": state, **{k: int(v) for k, v in ports.items()}}
    finally:
        down = local_sh(env, "down", timeout=300)
        assert down.returncode == 0, down.stderr[-2000:]
        assert not [p for p in state.glob("*.pid")], "down left a process group"
        shutil.rmtree(state, ignore_errors=True)


def bucket(cluster: dict):
    from pyarrow import fs

    return fs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{cluster['S3_PORT']}", access_key="testing",
                           secret_key="testing", region="us-east-1", scheme="http")


def test_a_submitted_search_logs_to_the_clusters_mlflow_and_stores_in_its_bucket(cluster, tmp_path):
    out = tmp_path / "search.json"
    t0 = time.time()
    job = local_sh(cluster["env"], "submit", "--num-samples", "2", "--epochs", "2", "--top-k", "1",
                   "--aa-n-examples", "20", "--name", "jobsearch", "--summary-json", str(out), timeout=900)
    text = job.stdout + job.stderr
    print(f"job: {time.time() - t0:.0f}s")
    assert job.returncode == 0, text[-5000:]
    assert "Job 'raysubmit_" in text and "succeeded" in text
    assert not error_lines(text), error_lines(text)  # quiet: no error-level line in a healthy run
    assert "trial " in text and "val_pgd10" in text and "best:" in text  # the search's table
    assert "AutoAttack on trial" in text
    s = json.loads(out.read_text())
    assert s["num_trials"] == 2 and s["best"]["metrics"]["test_aa_acc"] >= 0.0
    # the summary's checkpoints keep their scheme (Ray reports bucket/key); AutoAttack read the best one from S3
    assert s["best"]["checkpoint"].startswith("s3://raydistill/runs/jobsearch/trials/jobsearch-"), s["best"]["checkpoint"]
    assert all(t["checkpoint"].startswith("s3://") for t in s["trials"] if t["checkpoint"])
    assert s["tracking_uri"] == f"http://127.0.0.1:{cluster['MLFLOW_PORT']}"
    c = MlflowClient(s["tracking_uri"])  # the cluster's MLflow server: the job was given no --tracking-uri
    parent = c.get_run(s["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    kids = c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{s['mlflow_run_id']}'")
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    assert "test/aa_acc" in c.get_run(s["best"]["mlflow_run_id"]).data.metrics
    # ... and the bucket (RAYDISTILL_STORAGE of `ray start`): the job was given no --storage-path
    from pyarrow.fs import FileSelector

    trials = bucket(cluster).get_file_info(FileSelector("raydistill/runs/jobsearch/trials"))
    assert len([t for t in trials if t.base_name.startswith("jobsearch-")]) == 2


def test_a_job_whose_mlflow_store_would_be_in_rays_temporary_folder_is_refused(cluster):
    """A cluster without MLFLOW_TRACKING_URI: MLflow's default store, ./mlflow.db, would be in Ray's temporary
    copy of the working directory."""
    env = {**cluster["env"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster["state"] / "auth_token")}
    job = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{cluster['DASHBOARD_PORT']}",
                          "--working-dir", ".", "--", "env", "-u", "MLFLOW_TRACKING_URI", "python", "-m",
                          "raydistill.train", "pgd_at", "--preset", "quickstart", "--name", "lost"],
                         env=env, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    text = job.stdout + job.stderr
    assert job.returncode != 0 and "failed" in text
    refusals = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert refusals and all(ln == refusals[0] for ln in refusals), text[-3000:]  # the job's log, echoed twice
    for needle in ("runtime_resources/working_dir_files", "--tracking-uri http://HEAD:5000",
                   "MLFLOW_TRACKING_URI in the environment of `ray start`", "docs/clusters.md"):
        assert needle in refusals[0], needle
    assert "Traceback" not in text
    # without the token the cluster refuses the client
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    bare["HOME"] = str(cluster["state"])  # no ~/.ray/auth_token here
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address",
                              f"http://127.0.0.1:{cluster['DASHBOARD_PORT']}"],
                             env=bare, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0


def test_a_driver_whose_storage_the_nodes_cannot_open_is_refused(cluster, tmp_path):
    """A driver run from a shell whose S3 variables point at another store than the cluster's nodes have (their
    workers take `ray start`'s environment): one error line naming the variables, before any MLflow run."""
    other = S3Server(tmp_path, bucket="shell-only")
    try:
        env = {**cluster["env"], **other.env, "RAY_ADDRESS": f"127.0.0.1:{cluster['RAY_PORT']}", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN_PATH": str(cluster["state"] / "auth_token"),
               "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{cluster['MLFLOW_PORT']}"}
        proc = subprocess.run([sys.executable, "-m", "raydistill.train", "pgd_at", "--preset", "quickstart",
                               "--storage-path", "s3://shell-only/runs", "--name", "shell"],
                              env=env, cwd=str(REPO), capture_output=True, text=True, timeout=300)
    finally:
        other.stop()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in ("s3://shell-only/runs", "cannot be opened from 2 of the cluster's 2 nodes",
                   "there AWS_ENDPOINT_URL is missing or set otherwise than here",
                   "environment of `ray start`"):
        assert needle in lines[0], needle
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert not c.search_runs([e.experiment_id for e in c.search_experiments()], "tags.`raydistill.name` = 'shell'")
