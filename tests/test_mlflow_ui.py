"""The MLflow UI shows raydistill's runs: a real ``mlflow server`` on 127.0.0.1 and headless Chromium.

CI installs Chromium with .ci/install-chromium.sh; without it this test is skipped.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_report import make_run

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                 reason=f"{CHROMIUM} is missing: run .ci/install-chromium.sh (Debian's chromium package)")]
RUN_NAMES = ["pgd_at-small_cnn-s0", "pgd_at-small_cnn-s1", "peeraid-small_cnn-s0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """A tracking server on 127.0.0.1 over a sqlite store holding a few raydistill-shaped runs."""
    from mlflow.tracking import MlflowClient

    from raydistill import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("raydistill")  # as MLflow creates one: no experiment kind
    c.create_experiment("study", artifact_location=str(tmp_path / "artifacts"))
    ours = tracking.experiment_id(c, "study")  # as raydistill creates one: a model-training experiment
    runs = {}
    for e in (exp, ours):
        for name in RUN_NAMES:
            method, arch, seed = name.rsplit("-", 2)
            runs[e, name] = make_run(c, e, method, arch, int(seed[1:]), {"clean": 0.8, "pgd20": 0.4}, workers=2,
                                     diagnostics={"val/pgd10_acc": [0.3, 0.35, 0.4]}, name=name)
    # a training run's model (as train logs it) and its study's registered model (as a study registers it)
    from raydistill.checkpoint import save_model
    from raydistill.models import build_model

    save_model(tmp_path / "ck", build_model("small_cnn", 10, (1, 8, 8)), "small_cnn", 10, (1, 8, 8),
               {"method": "pgd_at", "dataset": "digits", "eps": 0.1, "step_size": 0.025})
    run = runs[ours, RUN_NAMES[0]]
    model_id = tracking.log_model(uri, run, tmp_path / "ck" / "model.pt")
    assert tracking.register_best(uri, "ui", {"pgd_at": [{"mlflow_run_id": run, "seed": 0, "metrics": {
        "aa_acc": 0.35, "pgd20_acc": 0.4}}]}) == {"pgd_at": "models:/ui-pgd_at/1"}
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", uri, "--default-artifact-root", str(tmp_path / "artifacts"),
                             "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
                time.sleep(1)
        yield {"runs": f"{url}/#/experiments/{exp}/runs", "plain": f"{url}/#/experiments/{exp}",
               "ours": f"{url}/#/experiments/{ours}", "link": tracking.ui_link(url, "study"),
               "version": f"{url}/#/models/ui-pgd_at/versions/1", "run": f"{url}/#/experiments/{ours}/runs/{run}",
               "model": f"{url}/#/experiments/{ours}/models/{model_id}", "model_id": model_id}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started (its own session)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=15000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_experiment_page_lists_the_runs(server, tmp_path):
    from PIL import Image, ImageStat

    shot = tmp_path / "mlflow-ui.png"
    proc = chromium(tmp_path, server["runs"], f"--screenshot={shot}")
    assert shot.exists(), proc.stderr[-3000:]
    assert shot.stat().st_size > 20_000
    with Image.open(shot) as img:
        assert img.size == (1400, 900)
        assert max(ImageStat.Stat(img.convert("RGB")).stddev) > 20  # not a blank page
    print(f"screenshot: {shot}")

    dom = chromium(tmp_path, server["runs"], "--dump-dom").stdout
    for name in RUN_NAMES:
        assert name in dom, f"{name} is not on the experiment page"


def test_the_link_raydistill_prints_opens_the_experiment_on_its_runs(server, tmp_path):
    """MLflow 3.17 opens an experiment on its GenAI overview (no runs listed), whatever its kind tag
    (raydistill sets mlflow.experimentKind=custom_model_development, which earlier MLflow 3 UIs follow); the link
    raydistill prints (tracking.ui_link: workflowType=machine_learning) opens on its runs table."""
    plain = chromium(tmp_path, server["ours"], "--dump-dom").stdout
    assert server["link"].startswith(server["ours"] + "?")
    ours = chromium(tmp_path, server["link"], "--dump-dom").stdout
    assert not any(name in plain for name in RUN_NAMES), "MLflow's experiment page now opens on its runs"
    for name in RUN_NAMES:
        assert name in ours, f"{name} is not on the page the link opens"


def text_of(dom: str) -> str:
    """A page's visible text, on one line."""
    import html
    import re

    dom = re.sub(r"<script.*?</script>|<style.*?</style>", "", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def test_the_model_pages_show_the_logged_and_the_registered_model(server, tmp_path):
    """The registered model's version page (its tags, its source run and model), the logged model's page (its
    parameters, test figures and registered version; its artifacts: MLmodel, the checkpoint file) and the run's page
    (its logged model and registered version)."""
    version = text_of(chromium(tmp_path, server["version"], "--dump-dom").stdout)
    for needle in ("ui-pgd_at", "Version 1", f"Source Run : {RUN_NAMES[0]}", "Source Model : model",
                   "aa_acc 0.3500", "method pgd_at", "pgd20_acc 0.4000", "seed 0", "selected_by aa_acc"):
        assert needle in version, (needle, version[:3000])
    model = text_of(chromium(tmp_path, server["model"], "--dump-dom").stdout)
    for needle in (f"Model ID {server['model_id']}", f"Source run {RUN_NAMES[0]}", "Model versions ui-pgd_at v1",
                   "test/clean_acc - pgd_at-small_cnn-s0 0.8", "eps 0.1", "step_size 0.025", "arch small_cnn"):
        assert needle in model, (needle, model[:3000])
    files = text_of(chromium(tmp_path, server["model"] + "/artifacts", "--dump-dom").stdout)
    for needle in ("MLmodel", "extra_files", "input_example.json", "requirements.txt"):
        assert needle in files, (needle, files[:3000])
    run = text_of(chromium(tmp_path, server["run"], "--dump-dom").stdout)
    assert "Logged models (1)" in run and "Registered models ui-pgd_at v1" in run, run[:3000]
