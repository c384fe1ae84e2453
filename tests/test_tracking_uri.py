"""The tracking URI, one check for every command (raydistill.tracking.resolve_uri): a folder or ``file:`` URI is
taken as ``sqlite:///<folder>/mlflow.db`` with one ``note:`` line (MLflow 3 refuses folder stores: the classic
``--tracking-uri ./mlruns`` used to end in a 40-line traceback); an unknown scheme is one ``error:`` line naming
the value and the accepted forms, exit 2, nothing created; MLFLOW_TRACKING_URI goes through the same check."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from raydistill import tracking
from raydistill.errors import UsageError

ACCEPTED = "accepted: sqlite:///FILE, a database (postgresql://, mysql://, mssql://), an MLflow server http(s)://"


def test_each_form(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert tracking.resolve_uri("./mlruns") == db  # a folder, relative
    assert tracking.resolve_uri("mlruns/") == db
    assert tracking.resolve_uri(f"file://{tmp_path}/mlruns") == db  # a file: URI, absolute or local host
    assert tracking.resolve_uri(f"file://localhost{tmp_path}/mlruns") == db
    assert tracking.resolve_uri("file:mlruns") == db
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 5 and all(n.startswith("note: --tracking-uri ") and n.endswith(f"its database {db}")
                                   for n in notes), notes
    tracking.resolve_uri("./mlruns")
    assert capsys.readouterr().err == ""  # a note once per value and process
    assert not (tmp_path / "mlruns").exists()  # resolving creates nothing
    assert tracking.resolve_uri("sqlite:///m.db") == f"sqlite:///{tmp_path}/m.db"
    for kept in ("http://127.0.0.1:5000", "https://mlflow.example.org", "databricks", "databricks://profile",
                 "postgresql://u@h/db", "mysql+pymysql://u@h/db", f"sqlite:///{tmp_path}/x.db"):
        assert tracking.resolve_uri(kept) == kept
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "envruns")
    assert tracking.resolve_uri(None) == f"sqlite:///{tmp_path}/envruns/mlflow.db"
    assert capsys.readouterr().err.startswith("note: MLFLOW_TRACKING_URI=envruns is a folder: MLflow 3 keeps no runs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "notascheme:/x")
    with pytest.raises(UsageError) as exc:
        tracking.resolve_uri(None)
    assert str(exc.value).startswith(f"MLFLOW_TRACKING_URI=notascheme:/x: unknown scheme 'notascheme:'; {ACCEPTED}")
    for bad, needle in (("notascheme:/x", "--tracking-uri notascheme:/x: unknown scheme 'notascheme:'"),
                        ("s3://bucket/mlruns", "--tracking-uri s3://bucket/mlruns: unknown scheme 's3:'"),
                        ("file://otherhost/x", "a file: URI names a folder of this machine (file:///PATH), not of host"),
                        ("m.txt", f"--tracking-uri m.txt is a file, not a folder; for an MLflow database file give "
                                  f"sqlite:///{tmp_path}/m.txt")):
        (tmp_path / "m.txt").write_text("")
        with pytest.raises(UsageError, match="accepted: sqlite:///FILE") as exc:
            tracking.resolve_uri(bad)
        assert needle in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.txt"]


def test_a_folder_holding_a_file_store_says_how_to_move_its_runs(tmp_path, capsys):
    (tmp_path / "old" / "0").mkdir(parents=True)
    (tmp_path / "old" / "0" / "meta.yaml").write_text("name: Default\n")
    uri = tracking.resolve_uri(str(tmp_path / "old"))
    assert f"`mlflow migrate-filestore --source {tmp_path}/old --target {uri}` moves them" in capsys.readouterr().err


def _run(module: str, *argv: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([sys.executable, "-m", f"raydistill.{module}", *argv], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from raydistill.checkpoint import save_model
    from raydistill.models import build_model

    folder = tmp_path_factory.mktemp("ck") / "nat"
    save_model(folder, build_model("small_cnn", 10, (1, 8, 8)), "small_cnn", 10, (1, 8, 8),
               {"dataset": "digits", "eps": 0.1, "step_size": 0.025})
    return folder


def test_every_command_refuses_an_unknown_scheme_in_one_line_and_creates_nothing(tmp_path, checkpoint):
    (tmp_path / "ok.yaml").write_text("dataset: digits\nstudent: small_cnn\nmethods: [pgd_at]\n"
                                      "search: {budget: {trial_epochs: 4}, epochs: 2}\n")
    store = ["--storage-path", str(tmp_path / "store")]
    flag = ["--tracking-uri", "notascheme:/x"]
    q = ["--workers", "0", "--student", "small_cnn", "--epochs", "1"]
    cases = {  # name -> (module, argv, env)
        "train": ("train", ["natural", *q, *store, *flag], None),
        "train_env": ("train", ["natural", *q, *store], {"MLFLOW_TRACKING_URI": "notascheme:/x"}),
        "tune": ("tune", ["natural", "--student", "small_cnn", "--epochs", "2", *store, *flag], None),
        "evaluate": ("evaluate", [str(checkpoint), "--attacks", "clean", *store, *flag], None),
        "evaluate_env": ("evaluate", [str(checkpoint), "--attacks", "clean", "--mlflow", *store],
                         {"MLFLOW_TRACKING_URI": "notascheme:/x"}),
        "report": ("report", ["--out", str(tmp_path / "rep"), *flag], None),
        "study": ("study", ["ok.yaml", *store, *flag], None),
    }
    procs = {name: _run(mod, *argv, cwd=tmp_path, env=env) for name, (mod, argv, env) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (name, err[-3000:])
        assert "notascheme:/x: unknown scheme 'notascheme:'; " + ACCEPTED in lines[0], (name, lines[0])
        assert lines[0].startswith("error: --tracking-uri " if "env" not in name else "error: MLFLOW_TRACKING_URI="), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.yaml"]


def test_a_folder_is_its_sqlite_database_for_evaluate_and_report(tmp_path, checkpoint):
    """evaluate logs to ./mlruns (given as the option, then by MLFLOW_TRACKING_URI), report reads it back."""
    ev = ["evaluate", str(checkpoint), "--attacks", "clean", "--n-examples", "20", "-q",
          "--storage-path", str(tmp_path / "store")]
    first = _run(*ev, "--tracking-uri", "./mlruns", cwd=tmp_path)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    db = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert f"note: --tracking-uri ./mlruns is a folder: MLflow 3 keeps no runs in folders, so they are in its database {db}" \
        in err.splitlines()
    second = _run(*ev, "--mlflow", "--name", "again", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "mlruns"})
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0 and "note: MLFLOW_TRACKING_URI=mlruns is a folder" in err, err[-3000:]
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(db).search_runs([MlflowClient(db).get_experiment_by_name("raydistill").experiment_id])
    assert len(runs) == 2 and all("test/clean_acc" in r.data.metrics for r in runs)
    rep = _run("report", "--tracking-uri", f"file://{tmp_path}/mlruns", "--out", str(tmp_path / "rep"), cwd=tmp_path)
    _, err = rep.communicate(timeout=300)
    assert "Traceback" not in err and f"its database {db}" in err, err[-3000:]  # found the store (no training run in it)
    assert "no training runs found" in err
