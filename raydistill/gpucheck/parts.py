"""The check's parts: pytest -m gpu, a short training run, the PGD-20 check, the benchmark."""
from __future__ import annotations

import re
from typing import Any

from . import (ARCHS, AUTHORS_BUDGET, BATCH, BENCH_BUDGET, BENCH_STEPS, BENCH_WARMUP, BF16_PEAK_TFLOPS, COMPILE_BUDGET,
               METHODS, PGD20_BUDGET, PYTEST_BUDGET, REPO, TRAIN, TRAIN_BUDGET)
from .runner import Runner, skipped


def gpu_test_files() -> list[str]:
    """Test files that mark tests ``gpu`` (``pytest.mark.gpu`` / ``pytestmark``): only those are
    collected, so test modules that import Ray or MLflow are never imported on the GPU machine."""
    tests = REPO / "tests"
    return sorted(str(p.relative_to(REPO)) for p in tests.glob("test_*.py") if "mark.gpu" in p.read_text(errors="replace"))


def part_pytest(runner: Runner, env_info: dict[str, Any]) -> None:
    name = "pytest_gpu"
    if not env_info.get("have", {}).get("pytest"):
        runner.record.part(name, skipped("pytest is not installed (fetch its wheels into .whl/: "
                                         "bash scripts/fetch-gpu-wheels.sh)", PYTEST_BUDGET))
        return
    files = gpu_test_files()
    if not files:
        runner.record.part(name, skipped("no test file marks tests gpu (pytest.mark.gpu)", PYTEST_BUDGET))
        return
    # the machine's other pytest plugins are not loaded (they may not fit the pytest that runs); pytest-timeout is
    plugins = ["-p", "pytest_timeout"] if env_info.get("have", {}).get("pytest_timeout") else []
    entry = runner.run(name, ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *plugins, "-o", "addopts=-ra",
                              *files], PYTEST_BUDGET, env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    tail = entry.get("output_tail", "")
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", tail.splitlines()[-1] if tail else "")
    entry["files"] = files
    entry["counts"] = {k.rstrip("s") if k.startswith("error") else k: int(n) for n, k in counts}
    if entry.get("rc") == 5:  # no test selected: not a failure of the check
        entry.update(status="skipped", reason="no test is marked gpu in " + ", ".join(files))
    runner.record.part(name, entry)


def part_train(runner: Runner) -> str | None:
    """The 2-epoch peeraid run; returns its checkpoint folder."""
    summary = runner.work / "train-summary.json"
    argv = ["-m", "raydistill.train", TRAIN["method"], "--dataset", TRAIN["dataset"], "--student", TRAIN["student"],
            "--epochs", str(TRAIN["epochs"]), "--batch-size", str(BATCH), "--workers", "0", "--tracking-uri", "none",
            "--storage-path", str(runner.work / "runs"), "--name", "gpu-check-peeraid",
            "--summary-json", str(summary)]
    entry = runner.run("train", argv, TRAIN_BUDGET, summary)
    s = entry.pop("result", None)
    if s:
        runner.record.data["train"] = {k: s.get(k) for k in ("method", "dataset", "student", "epochs_completed",
                                                                 "best_epoch", "metrics", "val_best_pgd10_acc",
                                                                 "wall_time_s", "checkpoint", "mlflow_run_id")}
    runner.record.part("train", entry)
    return s.get("checkpoint") if s and entry["status"] == "ok" else None


def part_pgd20(runner: Runner, checkpoint: str | None) -> None:
    if checkpoint is None:
        runner.record.part("pgd20_check", skipped("no checkpoint: the train part did not finish", PGD20_BUDGET))
        return
    out = runner.work / "pgd20.json"
    entry = runner.run("pgd20_check", ["-m", "raydistill.bench", "--pgd20-check", checkpoint, "--eval-examples", "500",
                                       "--summary-json", str(out)], PGD20_BUDGET, out)
    r = entry.pop("result", None)
    if r and "pgd20_check" in r:
        runner.record.data["pgd20_check"] = r["pgd20_check"]
    runner.record.part("pgd20_check", entry)


def part_authors(runner: Runner) -> None:
    """Our PeerAiD step (strict fp32, fast path) against the authors'-code step, on the same GPU."""
    out = runner.work / "authors.json"
    argv = ["-m", "raydistill.bench", "--compare-authors-peeraid", "--methods", "peeraid", "--student", "resnet18",
            "--dataset", "synthetic", "--image-size", "32", "--batch-size", str(BATCH), "--steps", str(BENCH_STEPS),
            "--warmup", str(BENCH_WARMUP), "--rounds", "3", "--eval-examples", str(BATCH),
            "--eval-batch-size", str(BATCH), "--summary-json", str(out)]
    entry = runner.run("authors_peeraid", argv, AUTHORS_BUDGET, out)
    r = entry.pop("result", None) or {}
    if "compare_authors_peeraid" in r:
        runner.record.data["authors_peeraid"] = r["compare_authors_peeraid"]
    runner.record.part("authors_peeraid", entry)


def bench_plan(precisions: list[str], compile_modes: list[str]) -> list[tuple[str, str, str, float]]:
    """(arch, precision, compile, budget) of each bench part: plain precisions first, compiled runs last."""
    plain = [p for p in ("fp32", "tf32", "bf16") if p in precisions]
    plan = [(arch, p, "none", BENCH_BUDGET[arch]) for arch in ARCHS for p in plain]
    if "bf16" in precisions and "all" in compile_modes:
        plan += [(arch, "bf16", "all", COMPILE_BUDGET) for arch in ARCHS]
    return plan


def part_bench(runner: Runner, arch: str, precision: str, compile_mode: str, budget: float) -> None:
    label = precision + ("+compile_" + compile_mode if compile_mode != "none" else "")
    name = f"bench:{arch}:{label}"
    out = runner.work / f"bench-{arch}-{label}.json"
    argv = ["-m", "raydistill.bench", "--methods", ",".join(METHODS), "--student", arch, "--dataset", "synthetic",
            "--image-size", "32", "--batch-size", str(BATCH), "--steps", str(BENCH_STEPS), "--warmup", str(BENCH_WARMUP),
            "--eval-examples", str(BATCH), "--eval-batch-size", str(BATCH), "--precision", precision,
            "--summary-json", str(out)]
    if compile_mode != "none":
        argv += ["--compile", compile_mode]
    entry = runner.run(name, argv, budget, out)
    r = entry.pop("result", None) or {}
    rows = r.get("results", [])
    for row in rows:
        runner.record.data["bench"].append({
            "method": row["method"], "arch": arch, "precision": label, "batch_size": row.get("batch_size"),
            "images_per_s": row.get("images_per_s"), "passes": row.get("passes"), "peak_mem_mb": row.get("peak_mem_mb"),
            "peak_mem_source": row.get("peak_mem_source"), "eval_images_per_s": row.get("eval_images_per_s"),
            "step_time_s": row.get("step_time_s"), "flops_per_step": row.get("flops_per_step"),
            "tflops_per_s": row.get("tflops_per_s"),
            "bf16_peak_share": row["tflops_per_s"] / BF16_PEAK_TFLOPS if row.get("tflops_per_s") else None})
    entry["methods_measured"] = [row["method"] for row in rows]
    if entry["status"] == "timeout" and rows:
        entry["status"] = "partial"  # some methods measured before the budget ran out
    runner.record.part(name, entry)
