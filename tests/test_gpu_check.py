"""What runs on a bare GPU machine (PyTorch and the data libraries, no Ray, MLflow, Optuna or
pyautoattack): the in-process loop with tracking off, evaluate and bench import none of them; and
``make gpu-check`` without CUDA records its GPU parts as skipped, with the reason, and exits 0."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raydistill.gpucheck.parts import bench_plan
from raydistill.gpucheck.realdata import run_leg
from raydistill.gpucheck.record import Record, markdown
from raydistill.gpucheck.runner import Runner

REPO = Path(__file__).resolve().parents[1]
ABSENT = ("ray", "mlflow", "optuna", "pyautoattack")

# runs a module as `python -m` does, with the packages above made unimportable (None in sys.modules:
# any `import ray` / `import mlflow.x` raises ImportError), and fails if one was imported anyway
BLOCKED = f"""
import runpy, sys
ABSENT = {ABSENT!r}
for m in ABSENT:
    sys.modules[m] = None
mod, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
finally:
    leaked = [m for m in sys.modules if m.split(".")[0] in ABSENT and sys.modules[m] is not None]
    assert not leaked, leaked
"""


def blocked(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-c", BLOCKED, module, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO), env=env)


def test_train_evaluate_bench_without_ray_mlflow(tmp_path: Path):
    """train --workers 0 --tracking-uri none, evaluate (clean, pgd20) of its checkpoint and bench, with
    Ray, MLflow, Optuna and pyautoattack unimportable: each succeeds; the run has no MLflow run id."""
    summary = tmp_path / "train.json"
    p = blocked("raydistill.train", "pgd_at", "--dataset", "digits", "--workers", "0", "--tracking-uri", "none",
                "--epochs", "1", "--storage-path", str(tmp_path / "runs"), "--name", "no-ray",
                "--summary-json", str(summary),
                # small: one attack step, a small validation split, clean test accuracy only
                "--attack-steps", "1", "--val-size", "50", "--batch-size", "256", "--test-attacks", "clean")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert s["mlflow_run_id"] is None and s["tracking_uri"] is None and s["epochs_completed"] == 1
    assert "none (tracking off)" in p.stdout
    assert not list(tmp_path.glob("**/mlflow.db")) and not (tmp_path / "mlruns").exists()

    out = tmp_path / "eval.json"
    p = blocked("raydistill.evaluate", s["checkpoint"], "--attacks", "clean,pgd20", "--n-examples", "32", "-q",
                "--tracking-uri", "none", "--summary-json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert set(json.loads(out.read_text())["metrics"]) == {"clean_acc", "pgd20_acc"}

    out = tmp_path / "bench.json"
    p = blocked("raydistill.bench", "--methods", "pgd_at", "--student", "small_cnn", "--dataset", "digits",
                "--batch-size", "16", "--steps", "2", "--warmup", "1", "--attack-steps", "1", "--eval-examples", "16",
                "--summary-json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["complete"] and [x["method"] for x in r["results"]] == ["pgd_at"] and r["results"][0]["images_per_s"] > 0


def test_tracking_none_is_refused_where_mlflow_is_needed():
    from raydistill import tracking
    from raydistill.errors import UsageError

    assert tracking.is_off("none") and tracking.is_off(" None ") and not tracking.is_off(None)
    assert not tracking.is_off("sqlite:///none.db")
    with pytest.raises(UsageError, match="only train and evaluate"):
        tracking.resolve_uri("none")


def test_make_gpu_check_without_cuda(tmp_path: Path):
    """``make gpu-check`` (else the module it runs) on a machine without CUDA: exit 0, both files
    written, every GPU part skipped with the reason, within seconds."""
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_OUT": str(out),
           "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels"), "GPU_CHECK_SITE": str(tmp_path / "site")}
    if shutil.which("make"):
        cmd = ["make", "-s", "gpu-check", f"GPU_PY={sys.executable}"]
    else:
        cmd = [sys.executable, "-m", "raydistill.gpucheck"]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    d = json.loads((out / "gpu-check.json").read_text())
    md = (out / "gpu-check.md").read_text()
    assert d["status"] == "done" and d["finished"] and d["cuda"] is False
    assert "no CUDA" in d["skip_reason"] and "no CUDA" in md
    gpu_parts = {k: v for k, v in d["parts"].items() if k != "pytest_gpu"}
    assert {"train", "pgd20_check", "bench:resnet18:fp32", "bench:wrn34_10:bf16", "bench:wrn34_10:bf16+compile_all",
            "realdata:train:pgd_at", "realdata:aa:peeraid"} <= set(gpu_parts)
    for name, part in gpu_parts.items():
        assert part["status"] == "skipped" and "no CUDA" in part["reason"], (name, part)
    assert d["parts"]["pytest_gpu"]["status"] in ("ok", "skipped"), d["parts"]["pytest_gpu"]
    assert d["bench"] == [] and d["train"] is None and d["pgd20_check"] is None and d["realdata"] is None
    assert "## Real data: Fashion-MNIST" in md and "No figures: no CUDA" in md
    assert "fashion_mnist" in d["environment"]  # the probe says where the real-data leg would read the files
    assert d["environment"]["torch"] and d["environment"]["raydistill_path"] == str(REPO / "raydistill")
    assert not list(out.glob(".*.tmp"))  # written atomically


def test_gpu_check_markdown_of_measured_parts():
    """The report's tables from a record with figures (as the GPU machine fills it)."""
    row = {"method": "peeraid", "arch": "wrn34_10", "precision": "bf16+compile_all", "images_per_s": 1234.5,
           "passes": {"student": {"forward": 12, "backward": 11}, "peer": {"forward": 12, "backward": 11}},
           "peak_mem_mb": 20480.0}
    d = {"status": "partial", "started": "t0", "finished": "t1", "wall_s": 470.0, "budget_s": 480.0,
         "skip_reason": None, "environment": {"gpu_name": "NVIDIA H200", "gpu_capability": "9.0", "gpu_memory_gib": 139.8,
                                              "torch": "2.11.0", "torch_cuda": "13.0", "python": "3.12.3",
                                              "precisions": ["fp32", "tf32", "bf16"]},
         "parts": {"bench:wrn34_10:bf16+compile_all": {"status": "partial", "wall_s": 45.0, "budget_s": 45,
                                                       "reason": "stopped after 45s"}},
         "bench": [row], "train": {"method": "peeraid", "dataset": "synthetic", "student": "resnet18",
                                   "epochs_completed": 2, "best_epoch": 2, "wall_time_s": 30.0,
                                   "metrics": {"clean_acc": 0.5, "pgd20_acc": 0.25}, "val_best_pgd10_acc": 0.3},
         "pgd20_check": {"n_examples": 500, "dataset": "synthetic", "pgd20_acc_fp32": 0.25, "pgd20_acc_fast": 0.252,
                         "difference_points": 0.2, "target_points": 0.5}}
    md = markdown(d)
    assert "NVIDIA H200" in md and "torch 2.11.0" in md
    assert "| peeraid | wrn34_10 | bf16+compile_all | 1234.5 | student 12f/11b, peer 12f/11b | 20480 |" in md
    assert "fp32 0.2500, fast path 0.2520, difference +0.20 points" in md
    assert "clean_acc 0.5000, pgd20_acc 0.2500" in md
    assert "| bench:wrn34_10:bf16+compile_all | partial | 45.0 | 45 | stopped after 45s |" in md


def test_gpu_check_markdown_has_the_peak_share_and_the_authors_race():
    row = {"method": "pgd_at", "arch": "resnet18", "precision": "bf16", "images_per_s": 5000.0, "passes": None,
           "peak_mem_mb": 1024.0, "tflops_per_s": 395.0, "bf16_peak_share": 0.5}
    race = {"authors_fp32": {"images_per_s": 1000.0, "speedup": 1.0},
            "ours_fp32": {"images_per_s": 1100.0, "speedup": 1.1}, "ours_fast": {"images_per_s": 2500.0, "speedup": 2.5}}
    d = {"status": "done", "started": "t0", "finished": "t1", "wall_s": 400.0, "budget_s": 480.0, "skip_reason": None,
         "environment": {}, "parts": {}, "bench": [row], "train": None, "pgd20_check": None, "authors_peeraid": race}
    md = markdown(d)
    assert "| pgd_at | resnet18 | bf16 | 5000.0 | - | 1024 | 395.0 | 50.0 % |" in md
    assert "ours_fp32: 1100.0 images/s, x1.100 the authors' step" in md
    assert "ours_fast: 2500.0 images/s, x2.500 the authors' step" in md


def test_gpu_check_plan_follows_the_option_table():
    plan = bench_plan(["fp32", "tf32", "bf16"], ["none", "attack", "all"])
    assert [(a, p, c) for a, p, c, _ in plan] == [
        ("resnet18", "fp32", "none"), ("resnet18", "tf32", "none"), ("resnet18", "bf16", "none"),
        ("wrn34_10", "fp32", "none"), ("wrn34_10", "tf32", "none"), ("wrn34_10", "bf16", "none"),
        ("resnet18", "bf16", "all"), ("wrn34_10", "bf16", "all")]
    assert all(p != "tf32" for _, p, _, _ in bench_plan(["fp32", "bf16"], ["none", "all"]))


def leg_runner(tmp_path: Path) -> Runner:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return Runner(Record(tmp_path / "out", 480), env, float("inf"), tmp_path)


def test_real_data_leg_without_the_files_is_skipped_with_the_reason(tmp_path: Path):
    runner = leg_runner(tmp_path)
    run_leg(runner, {"fashion_mnist": None, "fashion_mnist_error": "none in /x/data", "have": {"pyautoattack": True}})
    parts = runner.record.data["parts"]
    assert sorted(parts) == sorted(f"realdata:{k}:{m}" for k in ("train", "eval", "aa") for m in ("pgd_at", "peeraid"))
    for part in parts.values():
        assert part["status"] == "skipped" and "make gpu-data, and carry data/FashionMNIST" in part["reason"]
        assert "none in /x/data" in part["reason"]
    assert "No figures: Fashion-MNIST's IDX files are not here" in (tmp_path / "out" / "gpu-check.md").read_text()


@pytest.mark.slow
def test_real_data_leg_on_the_cpu_with_a_tiny_subset(tmp_path: Path):
    """The leg's code as the GPU runs it (train, evaluate clean+pgd20, AutoAttack; figures in both files), on a
    200-image subset for 1 epoch with 2 attack steps, 64 test images and AutoAttack on 8: it runs, not learns."""
    from raydistill import mnist

    if not mnist.complete(Path(mnist.DEBIAN_FASHION)):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    runner = leg_runner(tmp_path)
    small = dict(epochs={"pgd_at": 1, "peeraid": 1}, train_size=200, test_examples=64, aa_examples=8,
                 train_args=["--attack-steps", "2", "--val-size", "100", "--batch-size", "64"],
                 budgets={"train": 900, "eval": 600, "aa": 900})  # the GPU's budgets are seconds; a shared CPU is slower
    run_leg(runner, {"fashion_mnist": mnist.DEBIAN_FASHION, "have": {"pyautoattack": True}}, small)
    d = runner.record.data
    assert {n: p["status"] for n, p in d["parts"].items()} == {
        f"realdata:{k}:{m}": "ok" for m in ("pgd_at", "peeraid") for k in ("train", "eval", "aa")}, d["parts"]
    for method in ("pgd_at", "peeraid"):
        row = d["realdata"][method]
        assert set(row) >= {"clean_acc", "pgd20_acc", "aa_acc", "train_wall_s", "eval_wall_s", "aa_wall_s"}
        assert (row["epochs"], row["train_images"], row["eval_examples"], row["aa_examples"]) == (1, 200, 64, 8)
        assert 0 <= row["aa_acc"] <= row["pgd20_acc"] + 1 / 8 and 0 <= row["pgd20_acc"] <= row["clean_acc"] <= 1
    md = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "| pgd_at | 1 x 200 |" in md and "| peeraid | 1 x 200 |" in md and "(64)" in md and "(8)" in md
