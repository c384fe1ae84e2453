"""``python -m raydistill.report`` on a hand-made MLflow store: table values, files, MLflow logging, bad input."""
from __future__ import annotations

import math

import pytest
from conftest import assert_one_error_line, cli

from raydistill import report
from raydistill.errors import UsageError

T0 = 1_700_000_000_000  # ms
HOUR = 3_600_000


def make_run(c, exp: str, method: str, arch: str, seed: int, test: dict[str, float], *, hours: float | None = 1.0,
             workers: int = 1, gpus: float | None = None, parent: str | None = None, kind: str | None = None,
             diagnostics: dict[str, list[float]] | None = None, name: str | None = None) -> str:
    """A run shaped like the ones raydistill.train / tune write (tags, params, test/ and per-epoch val/ metrics)."""
    from mlflow.entities import Metric, Param

    name = name or f"{method}-{arch}-s{seed}"
    tags = {"raydistill.name": name, "method": method, "arch": arch, "dataset": "digits", "seed": str(seed)}
    if parent:
        tags["mlflow.parentRunId"] = parent
    if kind:
        tags["raydistill.kind"] = kind
    run_id = c.create_run(exp, start_time=T0, tags=tags, run_name=name).info.run_id
    params = [Param("workers", str(workers)), Param("epochs", "3")]
    if gpus is not None:
        params.append(Param("gpus_per_worker", str(gpus)))
    metrics = [Metric(f"test/{k}_acc", v, T0, 0) for k, v in test.items()]
    for key, values in (diagnostics or {}).items():
        metrics += [Metric(key, v, T0 + epoch, epoch) for epoch, v in enumerate(values)]
    c.log_batch(run_id, metrics=metrics, params=params)
    if hours is not None:
        c.set_terminated(run_id, "FINISHED", end_time=T0 + int(hours * HOUR))
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """pgd_at x3 seeds (CPU, no AA), peeraid x2 (half GPUs, AA, diagnostics), a search with 3 ard trials (one
    stopped early)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("raydistill")
    c.create_experiment("empty")
    for seed, (clean, pgd) in enumerate([(0.80, 0.40), (0.82, 0.44), (0.84, 0.42)]):
        make_run(c, exp, "pgd_at", "small_cnn", seed, {"clean": clean, "fgsm": pgd + 0.1, "pgd20": pgd}, workers=2, gpus=0.0)
    for seed, (clean, aa) in enumerate([(0.78, 0.30), (0.80, 0.34)]):
        make_run(c, exp, "peeraid", "small_cnn", seed, {"clean": clean, "pgd20": aa + 0.05, "aa": aa}, hours=0.5,
                 workers=2, gpus=0.5, diagnostics={"val/peer_acc_on_student_adv": [0.5, 0.6, 0.7 + 0.02 * seed],
                                                   "val/peer_acc_on_own_adv": [0.2, 0.25, 0.3]})
    parent = make_run(c, exp, "ard", "resnet18", 0, {}, kind="search", name="tune-ard")
    make_run(c, exp, "ard", "resnet18", 0, {"clean": 0.90, "pgd20": 0.50, "cw": 0.45}, parent=parent,
             diagnostics={"val/teacher_acc_on_student_adv": [0.4, 0.5]}, name="tune-ard-t0")
    make_run(c, exp, "ard", "resnet18", 1, {"clean": 0.88}, parent=parent, hours=None, name="tune-ard-t1")  # never ended
    make_run(c, exp, "ard", "resnet18", 2, {}, parent=parent, name="tune-ard-t2")  # stopped by ASHA: no test figures
    return {"uri": uri, "root": root, "client": c, "exp": exp, "parent": parent}


def row(table, method: str):
    rows = table[table["method"] == method]
    assert len(rows) == 1
    return rows.iloc[0]


def test_table_values_and_files(store, tmp_path):
    import matplotlib.image as mpimg
    import pyarrow.parquet as pq

    out = tmp_path / "rep"
    assert report.main(["--tracking-uri", store["uri"], "--out", str(out)]) == 0
    table = pq.read_table(out / "table.parquet").to_pandas()
    assert list(table["method"]) == ["peeraid", "pgd_at"]  # final runs only: no search parent, no trial

    pgd = row(table, "pgd_at")
    assert (pgd["runs"], pgd["seeds"]) == (3, 3)
    assert pgd["clean_mean"] == pytest.approx(0.82) and pgd["clean_std"] == pytest.approx(0.02)
    assert pgd["fgsm_mean"] == pytest.approx(0.52) and pgd["pgd20_std"] == pytest.approx(0.02)
    assert pgd["aa_n"] == 0 and math.isnan(pgd["aa_mean"])
    assert pgd["gpu_hours"] == pytest.approx(0.0) and pgd["device_hours"] == pytest.approx(6.0)  # 3 runs x 1 h x 2 workers

    peer = row(table, "peeraid")
    assert peer["aa_mean"] == pytest.approx(0.32) and peer["aa_std"] == pytest.approx(math.sqrt(2 * 0.02 ** 2))
    assert peer["clean_std"] == pytest.approx(math.sqrt(2 * 0.01 ** 2))
    assert peer["gpu_hours"] == pytest.approx(1.0)  # 2 runs x 0.5 h x 2 workers x 0.5 GPU
    assert peer["device_hours"] == pytest.approx(2.0)

    md = (out / "report.md").read_text()
    assert "| peeraid | small_cnn | digits | 79.00 ± 1.41 | – | 37.00 ± 2.83 | – | 32.00 ± 2.83 | 2 | 2 | 0 | 1.00 | 2.00 |" in md
    assert "over final runs (seeds)" in md and "Not in the table: 3 search trial(s)" in md
    assert "PGD-20 for the hollow markers" in md

    assert len(pq.read_table(out / "runs.parquet")) == 5
    diag = pq.read_table(out / "diagnostics.parquet").to_pandas()
    last = diag[(diag["metric"] == "val/peer_acc_on_student_adv") & (diag["epoch"] == 3)].iloc[0]
    assert last["mean"] == pytest.approx(0.71) and last["n"] == 2
    assert (out / "table.csv").read_text().startswith("method,arch,dataset,runs,seeds,untested,clean_mean")
    for png in ("pareto.png", "diagnostics.png"):
        img = mpimg.imread(out / png)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img[..., :3].std() > 0.05, png
    assert not list(out.glob(".report-*"))  # the staging folder is gone


def test_search_restricts_to_children_and_logs_to_parent(store, tmp_path):
    out = tmp_path / "rep"
    assert report.main(["--tracking-uri", store["uri"], "--search", "tune-ard", "--out", str(out), "--log-to-mlflow"]) == 0
    import pandas as pd

    table = pd.read_csv(out / "table.csv")
    assert list(table["method"]) == ["ard"] and (table["runs"][0], table["untested"][0]) == (2, 1)
    ard = table.iloc[0]
    assert ard["clean_mean"] == pytest.approx(0.89) and ard["pgd20_n"] == 1 and math.isnan(ard["pgd20_std"])
    assert ard["gpu_hours"] == pytest.approx(0.0) and ard["device_hours"] == pytest.approx(2.0)  # no GPU param; t1 never ended
    assert (out / "diagnostics.png").exists()  # the ard trial's val/teacher_acc_on_student_adv
    md = (out / "report.md").read_text()
    # 3 trials, figures from the 2 with test figures, never called seeds
    assert "| ard | resnet18 | digits | 89.00 ± 1.41 | – | 50.00 (n=1) | 45.00 (n=1) | – | 2 | 1 | 0.00 | 2.00 |" in md
    assert "| Trials | Stopped |" in md and "not seed noise" in md and "Seeds" not in md
    assert "Robust accuracy is PGD-20: no run has an AutoAttack result" in md
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "report")}
    assert {"report/report.md", "report/table.parquet", "report/pareto.png"} <= logged


def test_log_to_new_report_run_not_counted_later(store, tmp_path):
    c = store["client"]
    assert report.main(["--tracking-uri", store["uri"], "--out", str(tmp_path / "a"), "--log-to-mlflow"]) == 0
    reports = c.search_runs([store["exp"]], "tags.`raydistill.kind` = 'report'")
    assert reports and reports[0].info.status == "FINISHED"
    assert any(a.path == "report/report.md" for a in c.list_artifacts(reports[0].info.run_id, "report"))
    assert report.main(["--tracking-uri", store["uri"], "--out", str(tmp_path / "b")]) == 0
    assert "; 5 runs;" in (tmp_path / "b" / "report.md").read_text()


@pytest.mark.parametrize("args, needle", [
    (["--experiment", "nope"], "--experiment 'nope' not found"),
    (["--experiment", "empty"], "no training runs found"),
    (["--search", "nope"], "--search 'nope': no search with that name; known searches: tune-ard"),
    (["--parent-run-id", "0123abcd"], "--parent-run-id 0123abcd: no such MLflow run"),
])
def test_bad_selection(store, tmp_path, args, needle):
    out = tmp_path / "rep"
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        report.main(["--tracking-uri", store["uri"], "--out", str(out), *args])
    assert not out.exists()


@pytest.mark.parametrize("uri, needle", [
    ("http://127.0.0.1:9", "unreachable"),
    ("bogus://nowhere", "--tracking-uri bogus://nowhere: unknown scheme 'bogus:'; accepted: sqlite:///FILE"),
])
def test_bad_tracking_uri(tmp_path, uri, needle):
    with pytest.raises(UsageError, match=needle):
        report.main(["--tracking-uri", uri, "--out", str(tmp_path / "rep")])


def test_missing_store_is_not_created(tmp_path):
    db = tmp_path / "none.db"
    with pytest.raises(UsageError, match="no MLflow database"):
        report.main(["--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "rep")])
    assert not db.exists()


def test_cli(store, tmp_path):
    """As a user runs it: the table on stdout, files written; bad input is one error line, exit 2."""
    out = tmp_path / "cli"
    proc = cli("report", "--tracking-uri", store["uri"], "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| Method | Arch | Dataset | Clean | FGSM | PGD-20 | CW-inf | AA |" in proc.stdout
    assert {p.name for p in out.iterdir()} >= {"report.md", "table.csv", "table.parquet", "pareto.png", "diagnostics.png"}

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_error_line(cli("report", "--tracking-uri", store["uri"], "--out", str(blocker / "sub"), timeout=300),
                          "--out", "not a writable folder")
