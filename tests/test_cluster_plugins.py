"""A plugin given as a file on a real 2-node Ray cluster (two `ray start` processes on this machine, 1 CPU each,
token authentication, the storage a folder both reach (RAYDISTILL_SHARED_FS=1) or its S3 bucket): the driver ships
it to every worker of every node; a `ray job submit --working-dir` search with its AutoAttack step runs it as well;
a plugin package that the nodes lack is one error line naming the node.

How we know where the plugin ran: tests/plugins/ce_plus.py leaves a file named ``<Ray node id>-<pid>`` in the
folder CE_PLUS_TRACE names, from each process whose training step ran it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, assert_one_error_line, cli, error_lines
from test_plugins import METHOD, PLUGINS, fake_package

pytestmark = pytest.mark.slow
TINY = ["--dataset", "digits", "--student", "tiny_mlp", "--epochs", "1", "--attack-steps", "2", "--batch-size", "128",
        "--val-size", "100", "--test-attacks", "clean,pgd20"]


@pytest.fixture
def cluster(cluster2):
    """The session's 2-node cluster (1 CPU per node; tests/conftest.py): its nodes' CE_PLUS_TRACE is where the
    plugin leaves its trace. Storage here is a folder both nodes reach (one machine): RAYDISTILL_SHARED_FS=1; a
    submitted job, which runs in the head node's environment, stores in its S3 bucket (s3)."""
    ray = cluster2.ray
    env = {**ray.env, "RAYDISTILL_SHARED_FS": "1"}
    return SimpleNamespace(env=env, dashboard=ray.dashboard, s3=cluster2.s3), cluster2.work


def user_folder(tmp: Path) -> Path:
    """The user's folder: the plugin file and its search space, nowhere the nodes import from."""
    (tmp / "user").mkdir()
    for f in ("ce_plus.py", "ce_plus.yaml"):
        shutil.copy(PLUGINS / f, tmp / "user" / f)
    return tmp / "user"


def nodes_that_ran(trace: Path) -> set[str]:
    """The Ray nodes whose workers trained with the plugin (the driver's own 2-image check is ``local-``)."""
    return {p.name.rsplit("-", 1)[0] for p in trace.iterdir() if not p.name.startswith("local-")} if trace.exists() else set()


def test_a_plugin_file_reaches_the_workers_on_both_nodes(cluster, tmp_path):
    ray, work = cluster
    user = user_folder(tmp_path)
    shutil.rmtree(work / "trace", ignore_errors=True)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = cli("train", "ce_plus", "--plugin", str(user / "ce_plus.py"), *TINY, "--workers", "2", "--cpus-per-worker", "1",
               "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri, "--name", "p2",
               "--summary-json", str(tmp_path / "p2.json"), env=ray.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not error_lines(proc.stdout + proc.stderr), error_lines(proc.stdout + proc.stderr)
    ran = nodes_that_ran(work / "trace")
    assert len(ran) == 2, f"the plugin ran on {ran}, not on both nodes"
    s = json.loads((tmp_path / "p2.json").read_text())
    digest = "sha256:" + __import__("hashlib").sha256((user / "ce_plus.py").read_bytes()).hexdigest()
    assert s["plugins"]["ce_plus"]["digest"] == digest and s["epochs_completed"] == 1
    assert MlflowClient(uri).get_run(s["mlflow_run_id"]).data.tags["plugin.ce_plus"] == digest
    print(f"ce_plus trained on nodes {sorted(ran)}")


def test_a_submitted_search_ships_the_plugin_and_attacks_its_best_trial(cluster, tmp_path):
    """`ray job submit --working-dir USER -- python -m raydistill.tune ce_plus --plugin ce_plus.py`: the job's own
    runtime environment (its working_dir and a variable of its own) and the plugin's are merged. The job's driver
    runs in the head node's environment (the nodes' S3 variables, not this test's RAYDISTILL_SHARED_FS): its storage
    is the cluster's S3 bucket, as a submitted job's is."""
    ray, work = cluster
    user = user_folder(tmp_path)
    trace = tmp_path / "job-trace"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray.dashboard, "--working-dir", str(user),
           "--runtime-env-json", json.dumps({"env_vars": {"CE_PLUS_TRACE": str(trace)}}), "--",
           "python", "-m", "raydistill.tune", "ce_plus", "--plugin", "ce_plus.py", *TINY, "--num-samples", "2",
           "--max-concurrent", "2", "--cpus-per-worker", "1", "--scheduler", "none", "--top-k", "1", "--aa-n-examples", "20",
           "--storage-path", ray.s3.uri("plugin-job"), "--tracking-uri", uri, "--name", "jt",
           "--summary-json", str(tmp_path / "jt.json")]
    job = subprocess.run(cmd, env=ray.env, cwd=str(tmp_path), capture_output=True, text=True, timeout=1200)
    text = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in text, text[-5000:]
    ran = nodes_that_ran(trace)
    assert len(ran) == 2, f"the search's trials ran the plugin on {ran}, not on both nodes"
    s = json.loads((tmp_path / "jt.json").read_text())
    assert s["num_trials"] == 2 and s["best"]["metrics"]["test_aa_acc"] >= 0.0
    assert s["plugins"]["ce_plus"]["digest"] == "sha256:" + __import__("hashlib").sha256(
        (user / "ce_plus.py").read_bytes()).hexdigest()
    assert s["plugins"]["ce_plus"]["source"] == "ce_plus.py (in the submitted job's --working-dir)"
    c = MlflowClient(uri)
    assert c.get_run(s["mlflow_run_id"]).data.tags["plugin.ce_plus"] == s["plugins"]["ce_plus"]["digest"]
    assert all(c.get_run(t["mlflow_run_id"]).data.tags["plugin.ce_plus"] == s["plugins"]["ce_plus"]["digest"]
               for t in s["trials"])
    assert set(s["trials"][0]["params"]) == {"beta", "lr"}  # the plugin's own search space
    print(f"search: trials on nodes {sorted(ran)}, AA of the best trial {s['best']['metrics']['test_aa_acc']:.3f}")


def test_an_installed_plugin_the_nodes_lack_is_one_line_naming_a_node(cluster, tmp_path):
    """The driver has the package (on its PYTHONPATH), the nodes' workers do not: refused before anything runs."""
    ray, _ = cluster
    site = tmp_path / "site"
    fake_package(site, "rd-fake", "rd_fake", "[raydistill.methods]\nclean4 = rd_fake:Clean4\n",
                 METHOD.format(cls="Clean4", name="clean4"))
    env = {**ray.env, "PYTHONPATH": f"{REPO}:{site}"}
    proc = cli("train", "clean4", "--dataset", "digits", "--student", "small_cnn", "--epochs", "1", "--workers", "1", "--storage-path", str(tmp_path / "runs"),
               "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", env=env, timeout=600)
    assert_one_error_line(proc, "plugin rd-fake==0.3.0 (entry point raydistill.methods:clean4) is not installed on "
                                "node ", " (id ", "one of the cluster's 2)", "docs/clusters.md")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
