"""Running the parts as subprocesses within their budgets, and the set-up of the interpreter they run in."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import PROBE, REPO, RESERVE
from .record import Record


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
