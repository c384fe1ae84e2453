"""raydistill.tracking on a real sqlite MLflow store: runs started, found, closed and repaired; and the
source tree check that only tracking reaches MLflow."""
from __future__ import annotations

import ast
import re

import pytest
from conftest import REPO

from raydistill import tracking
from raydistill.errors import UsageError

EXP = "unit"


@pytest.fixture
def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def get(uri: str, run_id: str):
    from mlflow.tracking import MlflowClient  # the user's view of the store

    return MlflowClient(uri).get_run(run_id)


def test_open_run_reuses_the_run_of_the_same_name_and_kind_only(uri):
    a = tracking.open_run(uri, EXP, "a", tracking.KIND_RUN, tags={"method": "ard"}, params={"epochs": 3})
    run = get(uri, a)
    assert run.data.tags[tracking.NAME_TAG] == "a" and run.data.tags[tracking.KIND_TAG] == "run"
    assert run.info.run_name == "a" and run.data.params == {"epochs": "3"} and run.info.status == "RUNNING"
    tracking.close_run(uri, a, "FINISHED")
    assert tracking.open_run(uri, EXP, "a", tracking.KIND_RUN, tags={"method": "ard"}) == a  # a relaunch continues it
    assert get(uri, a).info.status == "RUNNING"
    search = tracking.open_run(uri, EXP, "a", tracking.KIND_SEARCH)  # same name, other kind: its own run
    assert search != a and tracking.open_run(uri, EXP, "a", tracking.KIND_SEARCH) == search
    assert tracking.open_run(uri, EXP, "a", tracking.KIND_SEARCH, reuse=False) not in (a, search)


def test_close_run_sets_the_reason_and_a_finished_close_drops_a_stale_one(uri):
    run_id = tracking.open_run(uri, EXP, "r", tracking.KIND_RUN, tags={"method": "ard"})
    tracking.close_run(uri, run_id, "FAILED", reason="boom: " + "x" * 6000)
    run = get(uri, run_id)
    assert run.info.status == "FAILED" and run.data.tags[tracking.FAILURE_TAG].startswith("boom: ")
    assert len(run.data.tags[tracking.FAILURE_TAG]) == 5000
    tracking.open_run(uri, EXP, "r", tracking.KIND_RUN)  # relaunched, then it succeeds
    tracking.close_run(uri, run_id, "FINISHED", tags={"best_trial": "t1"})
    run = get(uri, run_id)
    assert run.info.status == "FINISHED" and tracking.FAILURE_TAG not in run.data.tags
    assert run.data.tags["best_trial"] == "t1" and run.info.end_time
    with pytest.raises(ValueError, match="RUNNING"):
        tracking.close_run(uri, run_id, "RUNNING")


def test_find_runs_by_kind_parent_and_name(uri):
    parent = tracking.open_run(uri, EXP, "tune-x", tracking.KIND_SEARCH, tags={"method": "ard"})
    kids = [tracking.open_run(uri, EXP, f"tune-x-t{i}", tracking.KIND_RUN, tags={"method": "ard"}, parent=parent)
            for i in range(2)]
    alone = tracking.open_run(uri, EXP, "alone", tracking.KIND_RUN, tags={"method": "pgd_at"})
    report = tracking.open_run(uri, EXP, "report-1", tracking.KIND_REPORT)
    evaluation = tracking.open_run(uri, EXP, "evaluate m.pt", tracking.KIND_EVAL, tags={"dataset": "digits"})
    c = tracking.client(uri)  # a run written before runs had a kind tag counts as a training run
    legacy = c.create_run(tracking.experiment_id(c, EXP), tags={"method": "trades"}).info.run_id

    def ids(**kw):
        return {r.info.run_id for r in tracking.find_runs(uri, EXP, **kw)}

    assert ids(kind=tracking.KIND_RUN) == {*kids, alone, legacy}
    assert ids(kind=tracking.KIND_RUN, parent=parent) == set(kids)
    assert ids(parent=parent) == set(kids)
    assert ids(kind=tracking.KIND_SEARCH) == {parent}
    assert ids(kind=tracking.KIND_SEARCH, name="tune-x") == {parent} and not ids(kind=tracking.KIND_SEARCH, name="tune-y")
    assert ids(name="tune-x-t1") == {kids[1]}
    assert ids(kind=tracking.KIND_REPORT) == {report} and ids(kind=tracking.KIND_EVAL) == {evaluation}
    assert ids() == {parent, *kids, alone, report, evaluation, legacy}
    newest_first = [r.info.run_id for r in tracking.find_runs(uri, EXP, parent=parent)]
    assert newest_first == kids[::-1]
    assert tracking.find_runs(uri, "no-such-experiment") == []
    assert not ids(name="it's")  # a quote in a name is no broken filter


def test_log_batch_keeps_existing_params_and_translates_refusals(uri):
    run_id = tracking.open_run(uri, EXP, "e", tracking.KIND_EVAL, params={"test/eps": 0.03})
    clash = tracking.log_batch(uri, run_id, metrics={"test/clean_acc": 0.9}, params={"test/eps": 0.05, "test/n": 10})
    run = get(uri, run_id)
    assert clash == ["test/eps"] and run.data.params == {"test/eps": "0.03", "test/n": "10"}
    assert run.data.metrics == {"test/clean_acc": 0.9}
    many = {f"p{i}": i for i in range(250)}  # more than one request's worth
    assert tracking.log_batch(uri, run_id, params=many) == []
    assert len(get(uri, run_id).data.params) == 252
    with pytest.raises(UsageError, match=f"MLflow refused the results for run {run_id}"):
        tracking.log_batch(uri, run_id, metrics={"bad?name": 1.0})
    assert [(m.step, m.value) for m in tracking.metric_history(uri, run_id, "test/clean_acc")] == [(0, 0.9)]


def test_repair_trial_closes_runs_from_what_tune_saw(uri, tmp_path):
    def trial(name, status="RUNNING", reason=None):
        run_id = tracking.open_run(uri, EXP, name, tracking.KIND_RUN, tags={"method": "ard"})
        if status != "RUNNING":
            tracking.close_run(uri, run_id, status, reason)
        return get(uri, run_id)

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "last_model.pt").write_bytes(b"x")
    done = trial("done", "FAILED", "stopped while closing")
    tracking.repair_trial(uri, done, "COMPLETED", str(ckpt))
    stopped = trial("stopped", "FAILED", "asha stop")
    tracking.repair_trial(uri, stopped, "STOPPED")
    crashed = trial("crashed")
    tracking.repair_trial(uri, crashed, "ERROR", error="ValueError: nan loss")
    failed = trial("failed", "FAILED", "its own reason")
    tracking.repair_trial(uri, failed, "ERROR", error="Ray's wrapper")
    fine = trial("fine", "FINISHED")
    tracking.repair_trial(uri, fine, "STOPPED")

    run = get(uri, done.info.run_id)
    assert run.info.status == "FINISHED" and tracking.FAILURE_TAG not in run.data.tags
    assert [a.path for a in tracking.client(uri).list_artifacts(done.info.run_id, "checkpoints/last")] == \
        ["checkpoints/last/last_model.pt"]
    run = get(uri, stopped.info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["stopped_early"] == "asha" and tracking.FAILURE_TAG not in run.data.tags
    run = get(uri, crashed.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags[tracking.FAILURE_TAG] == "ValueError: nan loss"
    assert get(uri, failed.info.run_id).data.tags[tracking.FAILURE_TAG] == "its own reason"
    assert get(uri, fine.info.run_id).info.status == "FINISHED" and "stopped_early" not in get(uri, fine.info.run_id).data.tags


def test_store_checks(uri, tmp_path):
    missing = tmp_path / "none.db"
    with pytest.raises(UsageError, match="no MLflow database"):
        tracking.open_store(f"sqlite:///{missing}")
    assert not missing.exists()
    run_id = tracking.open_run(uri, EXP, "x", tracking.KIND_RUN)
    assert tracking.open_store(uri) == uri
    assert tracking.existing_experiment(uri, EXP) == get(uri, run_id).info.experiment_id
    with pytest.raises(UsageError, match="'nope' not found; the store has: Default, unit"):
        tracking.existing_experiment(uri, "nope")
    assert tracking.run_exists(uri, run_id) and not tracking.run_exists(uri, "0" * 32)


def test_a_local_store_in_rays_temporary_session_folder_is_refused(tmp_path, monkeypatch):
    """As in a `ray job submit` job on a cluster without MLFLOW_TRACKING_URI: the job's current folder is Ray's
    temporary copy of its working directory (this layout), where MLflow's default store ./mlflow.db would be lost
    with Ray's temporary files. The real job: tests/test_job_submit.py."""
    session = tmp_path / "ray" / "session_2026-01-02_03-04-05_678901_1234"
    job = session / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    job.mkdir(parents=True)
    (tmp_path / "ray" / "session_latest").symlink_to(session)
    monkeypatch.chdir(job)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for given in (None, "mlflow.db", "mlruns", f"sqlite:///{job}/m.db", f"file://{tmp_path}/ray/session_latest/mlruns"):
        with pytest.raises(UsageError, match=r"inside Ray's temporary session folder .* give --tracking-uri "
                                             r"http://HEAD:5000 .* MLFLOW_TRACKING_URI in the environment of `ray start`"):
            tracking.resolve_uri(given)
    assert not list(job.iterdir())  # nothing created
    for fine in ("http://127.0.0.1:5000", f"sqlite:///{tmp_path}/mlflow.db"):
        assert tracking.resolve_uri(fine) == fine
    assert tracking.resolve_uri(str(tmp_path / "session_notes")) == f"sqlite:///{tmp_path}/session_notes/mlflow.db"


# ----------------------------------------------------------------------------- source tree
SOURCES = sorted((REPO / "raydistill").rglob("*.py"))
OUTSIDE = [p for p in SOURCES if "tracking" not in p.relative_to(REPO / "raydistill").parts]
TAGS = (tracking.NAME_TAG, tracking.KIND_TAG, tracking.PARENT_TAG, tracking.RUN_NAME_TAG, tracking.FAILURE_TAG)


def _strings(tree: ast.AST):
    """String constants of the code, docstrings left out."""
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_only_tracking_reaches_mlflow():
    assert OUTSIDE and len(OUTSIDE) < len(SOURCES)
    for p in OUTSIDE:
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "mlflow" for a in node.names), f"{p}:{node.lineno} imports mlflow"
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "mlflow", f"{p}:{node.lineno} imports from {node.module}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) != ("tracking", "client"), f"{p}:{node.lineno} uses tracking.client"
            if isinstance(node, ast.Name):
                assert node.id != "MlflowClient", f"{p}:{node.lineno}"
        for s in _strings(tree):  # tag names are tracking's constants, never retyped (a typo hides runs)
            assert not any(re.search(rf"\b{re.escape(tag)}\b", s.value) for tag in TAGS), f"{p}:{s.lineno}: {s.value!r}"
