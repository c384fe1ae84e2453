"""``python -m raydistill.gpucheck`` (``make gpu-check``): the GPU smoke check and figures, in one command.

Made for a bare GPU machine that has PyTorch (torchvision, numpy, scikit-learn, PyYAML, pyarrow) but
no Ray, MLflow, Optuna or pyautoattack and no internet: everything runs in-process
(``--workers 0``) with tracking off (``--tracking-uri none``). Wheels it needs that the machine may lack
(pytest and its pure-Python dependencies; ``scripts/fetch-gpu-wheels.sh`` fetches them into ``.whl/``)
are installed with ``--no-deps`` into a target folder, never into the interpreter's environment, and
raydistill itself is installed there without dependencies (``pip install --no-deps
--no-build-isolation --target``); the checkout stays first on the path, so its source is what runs.

Parts, in this order, each a subprocess with its own time budget (a part that runs over is killed
and recorded as ``timeout``, with whatever it measured before):

1. ``pytest_gpu``: ``pytest -m gpu`` over the test files that mark tests ``gpu``;
2. ``train``: a 2-epoch in-process ``train peeraid`` (synthetic 32x32, resnet18), its final figures;
3. ``pgd20_check``: ``bench --pgd20-check`` on that checkpoint: PGD-20 accuracy in fp32 vs the fast path;
4. ``bench:ARCH:PRECISION``: ``bench`` on synthetic 32x32 data for pgd_at, trades, peeraid, adaad and
   at_aka with resnet18 and wrn34_10 (batch 128) in fp32, tf32 (when the option table has it), bf16,
   and bf16 with ``--compile all`` (the compiled runs last: they are the slowest to start).

Without CUDA the GPU parts (2-4) are recorded as skipped, with the reason, and the check takes
seconds; pytest still runs its selection (whose tests skip without CUDA).

``gpu-check.json`` and ``gpu-check.md`` are written to ``--out`` (default ``$GPU_CHECK_OUT``, else
``./gpu-check``) after every part, atomically: a check cut off still leaves what it measured.
The whole check keeps to ``--budget`` seconds (default ``$GPU_CHECK_BUDGET_S``, else 480).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METHODS = ("pgd_at", "trades", "peeraid", "adaad", "at_aka")
ARCHS = ("resnet18", "wrn34_10")
BATCH = 128
BENCH_STEPS, BENCH_WARMUP = 5, 2
TRAIN = dict(method="peeraid", dataset="synthetic", student="resnet18", epochs=2)
# part budgets (s); each part also stops at the check's overall deadline
PYTEST_BUDGET, TRAIN_BUDGET, PGD20_BUDGET = 75, 90, 45
BENCH_BUDGET = {"resnet18": 25, "wrn34_10": 40}  # per precision; compiled runs get COMPILE_BUDGET
COMPILE_BUDGET = 45
RESERVE = 5  # seconds kept back at the end for the last write

PROBE = r"""
import json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda_available"] = bool(torch.cuda.is_available())
    out["torch_cuda"] = torch.version.cuda
    if out["cuda_available"]:
        out["gpu_name"] = torch.cuda.get_device_name(0)
        out["gpu_count"] = torch.cuda.device_count()
        out["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
try:
    from raydistill.config import EXPERIMENT_FIELDS
    out["precisions"] = list(EXPERIMENT_FIELDS["precision"].metadata["choices"])
    out["compile_modes"] = list(EXPERIMENT_FIELDS["compile"].metadata["choices"])
    import raydistill
    out["raydistill_path"] = str(raydistill.__path__[0])
except Exception as exc:
    out["raydistill_error"] = f"{type(exc).__name__}: {exc}"
import importlib.util
out["have"] = {m: importlib.util.find_spec(m) is not None
               for m in ("pytest", "pytest_timeout", "ray", "mlflow", "optuna", "pyautoattack", "matplotlib")}
print("PROBE " + json.dumps(out))
"""


# ============================================================================= the record
class Record:
    """The check's results: held as a dict, written (JSON and Markdown, atomically) after each part."""

    def __init__(self, out: Path, budget: float):
        self.out, self.t0 = out, time.monotonic()
        self.data: dict[str, Any] = {
            "schema": 1, "status": "running", "started": _now(), "finished": None, "budget_s": budget,
            "wall_s": 0.0, "cuda": False, "skip_reason": None, "environment": {}, "setup": {}, "parts": {},
            "bench": [], "pgd20_check": None, "train": None}

    def part(self, name: str, entry: dict[str, Any]) -> None:
        self.data["parts"][name] = entry
        self.save()

    def save(self, final: bool = False) -> None:
        self.data["wall_s"] = round(time.monotonic() - self.t0, 1)
        if final:
            self.data["finished"] = _now()
            bad = [p["status"] for p in self.data["parts"].values() if p["status"] in ("failed", "timeout")]
            self.data["status"] = "partial" if bad else "done"
        self.out.mkdir(parents=True, exist_ok=True)
        _write(self.out / "gpu-check.json", json.dumps(self.data, indent=2, default=str) + "\n")
        _write(self.out / "gpu-check.md", markdown(self.data))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ============================================================================= running parts
class Runner:
    """Runs the parts as subprocesses of this interpreter, each within its budget and the deadline."""

    def __init__(self, record: Record, env: dict[str, str], deadline: float, work: Path):
        self.record, self.env, self.deadline, self.work = record, env, deadline, work

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE

    def run(self, name: str, argv: list[str], budget: float, result_file: Path | None = None,
            env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run ``python argv...``; the entry records status ok / failed / timeout, rc, wall time, the
        output's tail and the JSON ``result_file`` (read also after a timeout: it may hold a partial result)."""
        limit = min(budget, self.left())
        cmd = [sys.executable, *argv]
        entry: dict[str, Any] = {"status": "running", "budget_s": round(budget, 1), "command": shlex.join(cmd)}
        if limit < 5:
            entry.update(status="skipped", reason="the check's overall time budget is spent", wall_s=0.0)
            self.record.part(name, entry)
            return entry
        print(f"[gpu-check] {name}: {shlex.join(argv)} (limit {limit:.0f}s)", flush=True)
        log = self.work / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".log")
        t0 = time.monotonic()
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**self.env, **(env or {})}, cwd=REPO,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                entry["status"] = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill(proc)
                rc = None
                entry["status"] = "timeout"
                entry["reason"] = f"stopped after {limit:.0f}s (its budget, or what was left of the check's)"
        entry["rc"], entry["wall_s"] = rc, round(time.monotonic() - t0, 1)
        entry["output_tail"] = _tail(log.read_text(errors="replace"))
        if result_file is not None and result_file.exists():
            try:
                entry["result"] = json.loads(result_file.read_text())
            except json.JSONDecodeError:
                pass
        print(f"[gpu-check] {name}: {entry['status']} in {entry['wall_s']}s", flush=True)
        return entry


def _kill(proc: subprocess.Popen) -> None:
    """End the part's process group (its own session: torch.compile's workers too)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(text: str, lines: int = 15, chars: int = 3000) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def skipped(reason: str, budget: float | None = None) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason, "wall_s": 0.0, "budget_s": budget}


# ============================================================================= setup
def setup(record: Record, wheels: Path, site: Path, install: bool) -> dict[str, str]:
    """Install the carried wheels and raydistill (no dependencies) into ``site``; the subprocesses'
    environment: the checkout first on PYTHONPATH, then ``site``."""
    info: dict[str, Any] = {"wheels_dir": str(wheels), "site": str(site)}
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", TQDM_DISABLE="1")
    paths = [str(REPO)]
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    info["wheels"] = [w.name for w in found]
    # a wheel whose package the interpreter already has is left out: one version of each, and the
    # interpreter's pytest stays with the plugins installed beside it
    have = {w.name: installed_version(w.name.split("-")[0]) for w in found}
    info["wheels_already_installed"] = {k: v for k, v in have.items() if v}
    found = [w for w in found if not have[w.name]]
    if found or install:
        site.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        source = site.parent / "raydistill-src"
        if install:  # built from a copy: the build's egg-info and build/ stay out of the checkout
            copy_source(source)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
               "--no-compile", "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(site)]
        # the wheels first (one call: one version of each), then raydistill: a failed build of raydistill
        # (e.g. a setuptools too old for pyproject.toml) does not lose the wheels; the checkout runs anyway
        for what, items in (("wheels", [str(w) for w in found]), ("raydistill", [str(source)] if install else [])):
            if not items:
                continue
            try:
                r = subprocess.run(pip + items, capture_output=True, text=True, cwd=REPO, timeout=120)
                info[f"{what}_install"] = "ok" if r.returncode == 0 else f"failed: {_tail(r.stderr or r.stdout, 3)}"
            except (OSError, subprocess.TimeoutExpired) as exc:
                info[f"{what}_install"] = f"failed: {exc}"
        info["install_s"] = round(time.monotonic() - t0, 1)
        paths.append(str(site))
    else:
        info["install"] = "nothing to install"
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    record.data["setup"] = info
    return env


def installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def copy_source(dest: Path) -> None:
    """What building raydistill needs (pyproject.toml, README.md, the package), without caches."""
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "raydistill", dest / "raydistill", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def probe(env: dict[str, str]) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    for line in r.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    return {"probe_error": _tail(r.stderr or r.stdout, 5), "cuda_available": False}


# ============================================================================= the parts
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
            "step_time_s": row.get("step_time_s")})
    entry["methods_measured"] = [row["method"] for row in rows]
    if entry["status"] == "timeout" and rows:
        entry["status"] = "partial"  # some methods measured before the budget ran out
    runner.record.part(name, entry)


# ============================================================================= the Markdown
def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _passes(p: dict | None) -> str:
    if not p:
        return "-"
    return ", ".join(f"{n} {c['forward']}f/{c['backward']}b" for n, c in p.items())


def markdown(d: dict[str, Any]) -> str:
    e = d.get("environment", {})
    gpu = e.get("gpu_name") or "none (no CUDA)"
    lines = ["# raydistill GPU check", "",
             f"- status: **{d['status']}**; started {d['started']}, finished {d['finished'] or '-'}, "
             f"wall {d['wall_s']} s of a {d['budget_s']:.0f} s budget",
             f"- GPU: {gpu}" + (f" (capability {e['gpu_capability']}, {e['gpu_memory_gib']} GiB)" if e.get("gpu_capability") else ""),
             f"- torch {e.get('torch', '-')} (CUDA {e.get('torch_cuda') or '-'}), Python {e.get('python', '-')}; "
             f"precisions in the option table: {', '.join(e.get('precisions', [])) or '-'}"]
    if d.get("skip_reason"):
        lines.append(f"- GPU parts skipped: {d['skip_reason']}")
    lines += ["", "## Parts", "", "| part | status | wall s | budget s | note |", "| --- | --- | --- | --- | --- |"]
    for name, p in d["parts"].items():
        note = p.get("reason") or ""
        if p.get("counts"):
            note = (note + " " if note else "") + ", ".join(f"{n} {k}" for k, n in p["counts"].items())
        if p.get("status") == "failed" and p.get("output_tail"):
            note = (note + " " if note else "") + p["output_tail"].splitlines()[-1][:200]
        lines.append(f"| {name} | {p['status']} | {_fmt(p.get('wall_s'))} | {_fmt(p.get('budget_s'), '.0f')} | "
                     f"{note.replace('|', '/')} |")
    lines += ["", f"## Training throughput (bench: synthetic 32x32, batch {BATCH}, 10-step PGD, "
                  f"{BENCH_STEPS} timed steps after {BENCH_WARMUP})", ""]
    if d["bench"]:
        lines += ["| method | arch | precision | images/s | passes (forward/backward per step) | peak memory MiB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['method']} | {r['arch']} | {r['precision']} | {_fmt(r['images_per_s'])} | "
                  f"{_passes(r['passes'])} | {_fmt(r['peak_mem_mb'], '.0f')} |" for r in d["bench"]]
    else:
        lines.append("No figures: " + (d.get("skip_reason") or "no bench part finished a method") + ".")
    lines += ["", "## PGD-20: fp32 vs the fast path (fixed model)", ""]
    c = d.get("pgd20_check")
    if c:
        lines += [f"- {c['n_examples']} test images of {c['dataset']}, checkpoint of the train part",
                  f"- fp32 {c['pgd20_acc_fp32']:.4f}, fast path {c['pgd20_acc_fast']:.4f}, difference "
                  f"{c['difference_points']:+.2f} points (target within {c['target_points']})"]
    else:
        lines.append("No figures: " + (d["parts"].get("pgd20_check", {}).get("reason") or "not run") + ".")
    lines += ["", f"## Train: {TRAIN['epochs']}-epoch {TRAIN['method']}, in-process, tracking off", ""]
    t = d.get("train")
    if t:
        m = t.get("metrics") or {}
        lines += [f"- {t['method']} on {t['dataset']} ({t['student']}), epochs {t['epochs_completed']}, "
                  f"best epoch {t['best_epoch']}, wall {_fmt(t['wall_time_s'])} s",
                  "- final test figures: " + (", ".join(f"{k} {v:.4f}" for k, v in m.items()) or "-"),
                  f"- best validation PGD-10: {_fmt(t.get('val_best_pgd10_acc'), '.4f')}"]
    else:
        lines.append("No figures: " + (d["parts"].get("train", {}).get("reason") or "not run") + ".")
    return "\n".join(lines) + "\n"


# ============================================================================= main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raydistill.gpucheck",
                                description="GPU smoke check and throughput figures (make gpu-check).")
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or "gpu-check",
                   help="folder for gpu-check.json and gpu-check.md (default $GPU_CHECK_OUT, else ./gpu-check)")
    p.add_argument("--wheels", default=os.environ.get("GPU_CHECK_WHEELS") or str(REPO / ".whl"),
                   help="folder of carried wheels, installed --no-deps (default $GPU_CHECK_WHEELS, else .whl/)")
    p.add_argument("--site", default=os.environ.get("GPU_CHECK_SITE"),
                   help="target folder of those installs (default: a temporary folder)")
    p.add_argument("--no-install", action="store_true",
                   help="do not install raydistill into the target folder (the checkout runs in any case)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S") or 480),
                   help="seconds for the whole check (default $GPU_CHECK_BUDGET_S, else 480)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    t0 = time.monotonic()
    out = Path(args.out).expanduser().resolve()
    record = Record(out, args.budget)
    with tempfile.TemporaryDirectory(prefix="raydistill-gpu-check-") as tmp:
        work = Path(tmp)
        site = Path(args.site).expanduser().resolve() if args.site else work / "site"
        env = setup(record, Path(args.wheels).expanduser().resolve(), site, install=not args.no_install)
        info = probe(env)
        record.data["environment"] = info
        record.data["cuda"] = cuda = bool(info.get("cuda_available"))
        if not cuda:
            record.data["skip_reason"] = ("no CUDA: torch.cuda.is_available() is False" if "torch" in info
                                          else f"no PyTorch: {info.get('torch_error') or info.get('probe_error')}")
        record.save()
        print(f"[gpu-check] torch {info.get('torch')}, GPU {info.get('gpu_name') or 'none'}; writing {out}", flush=True)
        runner = Runner(record, env, t0 + args.budget, work)
        part_pytest(runner, info)
        plan = bench_plan(info.get("precisions", ["fp32", "bf16"]), info.get("compile_modes", ["none"]))
        if cuda:
            checkpoint = part_train(runner)
            part_pgd20(runner, checkpoint)
            for arch, precision, compile_mode, budget in plan:
                part_bench(runner, arch, precision, compile_mode, budget)
        else:
            reason = record.data["skip_reason"]
            record.part("train", skipped(reason, TRAIN_BUDGET))
            record.part("pgd20_check", skipped(reason, PGD20_BUDGET))
            for arch, precision, compile_mode, budget in plan:
                label = precision + ("+compile_" + compile_mode if compile_mode != "none" else "")
                record.part(f"bench:{arch}:{label}", skipped(reason, budget))
        record.save(final=True)
    print(f"[gpu-check] {record.data['status']} in {record.data['wall_s']}s: {out / 'gpu-check.md'}", flush=True)
    failed = [n for n, p in record.data["parts"].items() if p["status"] == "failed"]
    if failed:
        print(f"[gpu-check] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
