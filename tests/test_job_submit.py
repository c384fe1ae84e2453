"""The headline use: `ray job submit --working-dir . -- python -m raydistill.tune ...` against a
`ray start --head` cluster on this machine, with Ray's token authentication left on."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_a_search_on_a_token_authenticated_cluster(tmp_path):
    # as with an activated virtual environment: the job's `python` is the one raydistill is installed in
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_DEDUP_LOGS": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    try:
        out = tmp_path / "search.json"
        job = subprocess.run(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO), "--",
             "python", "-m", "raydistill.tune", "pgd_at", "--preset", "quickstart", "--num-samples", "2",
             "--epochs", "2", "--grace-period", "1", "--top-k", "0", "--name", "jobsearch",
             "--storage-path", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
             "--summary-json", str(out)],
            env=env, capture_output=True, text=True, timeout=900)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "succeeded" in job.stdout + job.stderr
        s = json.loads(out.read_text())
        assert s["num_trials"] == 2
        c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        exp = c.get_experiment_by_name("raydistill")
        kids = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{s['mlflow_run_id']}'")
        assert len(kids) == 2
        # without the token the cluster refuses the client
        bare = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        bare["HOME"] = str(tmp_path)  # no ~/.ray/auth_token here
        refused = subprocess.run([RAY, "job", "list", "--address", f"http://127.0.0.1:{dash}"], env=bare,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
