"""A cluster with no spare CPU: 2 nodes of 1 CPU each (two `ray start` processes, token auth on) and S3 (moto).

Another job holds a CPU in a placement group (as a finished trial's worker group did when Ray Train's clean-up
lagged): a search still ends with its AutoAttack figure, the sharded evaluation goes on with the one worker it can
get (figures equal to an in-process run), a worker that cannot be placed is given up, no CPU free at all gives up in
one line after --worker-wait, and SIGTERM ends an evaluation as Ctrl-C does. Made deterministic by holding the CPUs,
not left to the race."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, cli, error_lines

pytestmark = pytest.mark.slow
SMALL = ["--dataset", "digits", "--student", "small_cnn", "--eps", "0.1", "--step-size", "0.025", "--attack-steps", "3",
         "--val-size", "100", "--cpus-per-worker", "1"]


@pytest.fixture
def small(cluster2, tmp_path):
    """The session's 2-node cluster (1 CPU per node) and S3 server; this module's results shared between its tests."""
    return cluster2.ray, cluster2.s3, tmp_path, SHARED


SHARED: dict = {}  # the search's checkpoint, for the evaluations


def test_a_search_ends_with_its_autoattack_figure_while_another_job_holds_a_cpu(small):
    ray, s3, work, shared = small
    t0 = time.time()
    with ray.hold({"CPU": 1}):
        proc = cli("tune", "pgd_at", *SMALL, "--epochs", "2", "--workers", "1", "--num-samples", "2",
                   "--max-concurrent", "1", "--top-k", "1", "--aa-n-examples", "20", "--storage-path", s3.uri("tune"),
                   "--name", "s1", "--tracking-uri", f"sqlite:///{work}/mlflow.db",
                   "--summary-json", str(work / "s1.json"), env=ray.env, timeout=900)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "note: other jobs hold part of the cluster: CPU" in out and "placement group" in out, out[-3000:]
    assert re.search(r"^\[tune [0-9:]+\] AutoAttack on trial \w+ \(20 test images", out, re.M), out[-3000:]
    s = json.loads((work / "s1.json").read_text())
    best = s["trials"][0] if s["trials"][0]["metrics"].get("test_aa_acc") is not None else s["trials"][1]
    assert 0 <= best["metrics"]["test_aa_acc"] <= best["metrics"]["test_pgd20_acc"] <= best["metrics"]["test_clean_acc"]
    assert best["metrics"]["test_n_examples"] == 20
    shared["checkpoint"] = best["checkpoint"]
    print(f"tune (2 trials, AutoAttack on 20 images) beside a held CPU: {wall:.0f}s")


def test_the_evaluation_goes_on_with_the_one_worker_it_can_get(small):
    ray, s3, work, shared = small
    ckpt = shared.get("checkpoint") or pytest.skip("needs the search's checkpoint")
    args = ["evaluate", ckpt, "--attacks", "clean,fgsm,pgd20", "--batch-size", "128", "--storage-path", s3.uri("small-evals")]
    with ray.hold({"CPU": 1}):
        t0 = time.time()
        two = cli(*args, "--workers", "2", "--name", "two", "--summary-json", str(work / "two.json"), env=ray.env)
        wall = time.time() - t0
    assert two.returncode == 0, two.stderr[-3000:]
    assert "--workers 2: the cluster has room for 1 now (CPU 1 of 2 free; held: placement group" in two.stderr
    assert "(1 worker)" in two.stderr and not error_lines(two.stdout + two.stderr)
    here = cli(*args, "--workers", "0", "--name", "here", "--summary-json", str(work / "here.json"), env=ray.env)
    assert here.returncode == 0, here.stderr[-3000:]
    import pyarrow.parquet as pq

    fs = s3.filesystem()
    tables = [pq.read_table(f"raydistill/small-evals/evaluations/{n}/per_image.parquet", filesystem=fs) for n in ("two", "here")]
    assert tables[0].equals(tables[1])  # image by image
    a, b = (json.loads((work / f"{n}.json").read_text())["metrics"] for n in ("two", "here"))
    assert a == b
    print(f"evaluation beside a held CPU on 1 worker: {wall:.0f}s; {a}")


def test_a_worker_that_cannot_be_placed_is_given_up(small):
    """The race made deterministic: the free CPUs are read as 2 while another job holds one, so the second worker
    never starts; after the placement limit it is given up and the first one attacks every batch."""
    ray, s3, work, shared = small
    model_file = work / "m.pt"
    code = f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
import torch
from raydistill import evalpool, resources
from raydistill.evaluate import run_evaluation
from raydistill.train import init_ray
from conftest import natural_digits_model
init_ray()
real = resources.free
resources.free = lambda r="CPU": real(r) + (1.0 if r == "CPU" else 0.0)  # a stale view: one CPU more than is free
evalpool.PLACE_LIMIT_S = 1.0  # well within the attack's few seconds
model, data = natural_digits_model()
torch.save(model.state_dict(), {str(model_file)!r})  # what run_evaluation digests
s = run_evaluation({str(model_file)!r}, model, data, ["clean", "pgd20"], eps=0.1, step_size=0.025, n_examples=96,
                   batch_size=16, workers=2, storage_path={str(work / 'placed')!r}, name="late", dataset="digits")
print("ACC", s["metrics"])
"""
    with ray.hold({"CPU": 1}):
        proc = subprocess.run([sys.executable, "-c", code], env=ray.env, cwd=str(REPO), capture_output=True, text=True,
                              timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 worker could not be placed within 1s (CPU 0 of 2 free" in proc.stderr, proc.stderr[-3000:]
    assert "ACC" in proc.stdout


def test_no_cpu_free_gives_up_in_one_line_and_sigterm_ends_it_as_ctrl_c(small):
    ray, s3, work, shared = small
    ckpt = shared.get("checkpoint") or pytest.skip("needs the search's checkpoint")
    args = [sys.executable, "-m", "raydistill.evaluate", ckpt, "--attacks", "clean,pgd20", "--workers", "1",
            "--storage-path", s3.uri("small-evals"), "--name", "none"]
    with ray.hold({"CPU": 1}, {"CPU": 1}):
        # SIGTERM while it waits: one line, exit 130, no stack dump of Ray's signal handler
        driver = subprocess.Popen(args, env=ray.env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = []
        while not any("Ray workers ->" in ln for ln in first) and driver.poll() is None:
            first.append(driver.stderr.readline())  # its first line once Ray is up: "[evaluate] 2 units ... workers ->"
        time.sleep(3)
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
        err = "".join(first) + err
        assert driver.returncode == 130, err[-3000:]
        assert "[evaluate] interrupted: the finished batches are kept in s3://" in err
        assert error_lines(err) == ["error: interrupted"], err[-3000:]
        # nothing can be placed: it gives up after --worker-wait, in one line
        t0 = time.time()
        proc = cli("evaluate", *args[3:], "--worker-wait", "15", env=ray.env, timeout=300)
        wall = time.time() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: evaluation stopped: no evaluation worker (CPU 1) could be "
                                                     "placed in 1"), proc.stderr[-3000:]
    assert "(--worker-wait 15): CPU 0 of 2 free; held: placement group" in errors[0]
    assert "the finished batches are kept in s3://raydistill/small-evals/evaluations/none: the same command continues" in errors[0]
    assert wall < 120
