"""Shared fixtures. Tests run on the CPU (``gpu``-marked ones need CUDA and are skipped elsewhere); each gets
its own MLflow store and run folder."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def own_storage(tmp_path_factory):
    """Runs, searches and evaluations that name no --storage-path land in this session's folder, never in
    ~/ray_results: stored evaluations are reused by content (raydistill.evalrun), and a test must attack."""
    if "RAYDISTILL_STORAGE" in os.environ:
        yield
        return
    os.environ["RAYDISTILL_STORAGE"] = str(tmp_path_factory.mktemp("storage"))
    yield
    os.environ.pop("RAYDISTILL_STORAGE", None)


# ----------------------------------------------------------------------------- one cluster for the cluster tests
class _Shared:
    """The session's 2-node cluster and S3 server (``cluster2``), stopped after the last test that uses it."""

    state: dict = {}
    last_user: str | None = None

    @classmethod
    def stop(cls) -> None:
        ray, s3 = cls.state.pop("ray", None), cls.state.pop("s3", None)
        if ray is not None:
            ray.stop()
        if s3 is not None:
            s3.stop()


@pytest.fixture(scope="session")
def cluster2(tmp_path_factory):
    """A real 2-node Ray cluster, 1 CPU per node (nothing to spare: the edge users hit), token auth on, and moto's S3
    server as its storage (tests/cluster.py), shared by every cluster test of a pytest run: started once (about half
    a minute on 2 cores), stopped after the last test that uses it. The nodes' environment: the S3 variables, the
    code and tests/ on PYTHONPATH (loop hooks, test plugins), CE_PLUS_TRACE (where tests/plugins/ce_plus.py leaves
    a file per process that trained with it). Yields a namespace: ray (RayCluster), s3 (S3Server), work (a folder)."""
    from types import SimpleNamespace

    from cluster import RayCluster, S3Server

    if "ray" not in _Shared.state:
        work = tmp_path_factory.mktemp("cluster2")
        s3 = S3Server(work)
        try:
            ray = RayCluster(work / "ray", nodes=2, cpus=1, env={**s3.env, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
                                                                 "CE_PLUS_TRACE": str(work / "trace")})
        except BaseException:
            s3.stop()
            raise
        _Shared.state.update(ray=ray, s3=s3, work=work)
    yield SimpleNamespace(**_Shared.state)
    _Shared.stop()  # at the end of the session, if the last user did not stop it


def pytest_runtest_teardown(item, nextitem):
    if _Shared.last_user == item.nodeid:
        _Shared.stop()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: the last test that runs
def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests need CUDA: skipped (and counted as skipped) where there is none. The last test that uses
    the shared cluster stops it (``cluster2``)."""
    users = [item.nodeid for item in items if "cluster2" in getattr(item, "fixturenames", ())]
    _Shared.last_user = users[-1] if users else None
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny kernels run on one intra-op thread (OpenMP synchronisation would dominate on a shared CPU);
    the count is restored after the module. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fixed_linear(weight, bias):
    """A float64 Flatten + Linear network with the given weight (C, D) and bias (C,): logits by hand."""
    import torch
    from torch import nn

    lin = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight))
        lin.bias.copy_(torch.tensor(bias))
    return nn.Sequential(nn.Flatten(), lin).double()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder with runs/ and an MLflow sqlite store."""
    (tmp_path / "runs").mkdir()
    return tmp_path


def run_args(workdir: Path, name: str) -> list[str]:
    return ["--storage-path", str(workdir / "runs"), "--tracking-uri", f"sqlite:///{workdir}/mlflow.db",
            "--name", name, "--summary-json", str(workdir / f"{name}.json")]


def cli(module: str, *args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m raydistill.<module> args`` as a user would."""
    return subprocess.run([sys.executable, "-m", f"raydistill.{module}", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO), env={**os.environ, **(env or {})})


def train_with_hooks(hooks: list, *args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m raydistill.train args`` as ``cli`` runs it (a real subprocess, real Ray workers), with
    ``hooks`` (tests/loop_hooks.py objects) in every worker's loop: passed to ``train.main``, pickled; tests/
    is on the run's PYTHONPATH, so the driver and its Ray workers import loop_hooks to unpickle them."""
    code = ("import pickle, sys; from raydistill.errors import cli_entry; from raydistill.train import main; "
            "hooks = pickle.loads(bytes.fromhex(sys.argv[1])); cli_entry(lambda argv: main(argv, hooks=hooks))(sys.argv[2:])")
    env = {**os.environ, **(env or {})}
    path = os.pathsep.join(p for p in (str(REPO / "tests"), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", code, pickle.dumps(hooks).hex(), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO), env={**env, "PYTHONPATH": path})


def summary(workdir: Path, name: str) -> dict:
    return json.loads((workdir / f"{name}.json").read_text())


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


# An error-level line of a run's output: a Ray C++ log line at level E or F ("[2026-01-01 00:00:00,000 E 12 34]
# core_worker.cc:..."), a Python log record at ERROR or CRITICAL (or the job CLI's ERR), a traceback, an `error:` line
ERROR_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [EF] \d+ \d+\]|\s(ERR|ERROR|CRITICAL)\s"
                        r"|Traceback \(most recent call last\)|^error: ")


def error_lines(text: str) -> list[str]:
    """The error-level lines of ``text`` (a healthy run has none: README, "Quiet output")."""
    return [ln for ln in text.splitlines() if ERROR_LINE.search(ln)]


# A warning-level line: a Ray C++ log line at level W, a Python log record at WARNING (or a warnings-module line such as
# "UserWarning: ..."), a `warning:` line, or any line Ray forwarded to the driver from its workers, actors or raylet
# ("(PlacementGroupCleaner pid=12) Detected that ...": Ray prints its actors' warnings without their level)
WARNING_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ W \d+ \d+\]|\bWARN(ING)?\b|\b[A-Z]\w*Warning: |^warning: "
                          r"|^(\x1b\[[\d;]*m)?\((raylet|gcs_server|\w+ pid=\d+[^)]*)\)")


def warning_lines(text: str) -> list[str]:
    """The warning- and error-level lines of ``text``."""
    return [ln for ln in text.splitlines() if WARNING_LINE.search(ln) or ERROR_LINE.search(ln)]


def natural_digits_model():
    """(model, data): small_cnn trained naturally on digits (4 epochs of batch 64, about a second), in eval mode."""
    import torch
    import torch.nn.functional as F

    from raydistill.data import load_dataset, to_float
    from raydistill.models import build_model

    data = load_dataset("digits", val_size=0)
    torch.manual_seed(0)
    model = build_model("small_cnn", data.num_classes, data.in_shape)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = to_float(data.train_x), data.train_y
    for _ in range(4):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), data
