"""MLflow Models: a run's best checkpoint as the MLflow Model ``runs:/<id>/model`` (what ``train.launch`` logs through
``tracking.log_checkpoint``), loaded back by ``mlflow.pytorch.load_model`` in a fresh process with the checkpoint's
own accuracies; a study's registry entry (``tracking.register_best``) and evaluate reading ``runs:/`` and
``models:/`` URIs. No training run: a small_cnn trained in-process for a second stands for one."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, natural_digits_model

from raydistill import tracking
from raydistill.checkpoint import load_model, save_model
from raydistill.evaluation import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")
EPS, STEP = 0.1, 0.025
N = 100  # test images
LOAD = f"""
import json, sys, mlflow, mlflow.pytorch
from raydistill.data import load_dataset
from raydistill.evaluation import evaluate
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pytorch.load_model(sys.argv[2])
data = load_dataset("digits", val_size=0)
acc = evaluate(model, data.test_x[:{N}], data.test_y[:{N}], ["clean", "pgd20"], eps=0.1, step_size=0.025)
print(json.dumps({{"type": type(model).__name__, "training": model.training, **acc}}))
"""


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A checkpoint folder logged to a run as launch logs it; returns (uri, run id, checkpoint, its accuracies)."""
    tmp = tmp_path_factory.mktemp("models")
    model, data = natural_digits_model()
    ck = tmp / "checkpoint_000004"
    meta = {"method": "natural", "dataset": "digits", "eps": EPS, "step_size": STEP, "seed": 0, "epoch": 3,
            "selected_by": "val/clean_acc"}
    save_model(ck, model, "small_cnn", data.num_classes, data.in_shape, meta)
    uri = f"sqlite:///{tmp}/mlflow.db"
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).create_experiment("raydistill", artifact_location=str(tmp / "artifacts"))  # not ./mlruns
    run = tracking.open_run(uri, "raydistill", "nat", tracking.KIND_RUN, tags={"method": "natural"},
                            params={"attack_steps": 10, "eps": EPS})
    net, _ = load_model(ck)
    acc = evaluate(net, data.test_x[:N], data.test_y[:N], ["clean", "pgd20"], eps=EPS, step_size=STEP)
    tracking.log_batch(uri, run, metrics={"val/clean_acc": 0.5}, step=3)  # as a run logs: the last epoch's step,
    tracking.log_batch(uri, run, metrics={f"test/{k}": v for k, v in acc.items()}, step=4,  # its test figures after
                       tags={"epochs_completed": "4"})
    tracking.log_checkpoint(uri, run, str(ck))
    tracking.close_run(uri, run, "FINISHED")
    return uri, run, ck, acc


def test_load_model_in_a_fresh_process_gives_the_checkpoints_accuracy(logged):
    uri, run, ck, acc = logged
    proc = subprocess.run([sys.executable, "-c", LOAD, uri, f"runs:/{run}/model"], capture_output=True, text=True,
                          timeout=300, cwd="/", env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"type": "SmallCNN", "training": False, **acc}, (got, acc)
    assert 0.5 < acc["clean_acc"] and acc["pgd20_acc"] < acc["clean_acc"]


def test_the_model_holds_signature_input_example_and_threat_model(logged):
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    uri, run, ck, acc = logged
    c = MlflowClient(uri)
    (m,) = c.search_logged_models(experiment_ids=[c.get_run(run).info.experiment_id])
    assert m.name == "model" and m.source_run_id == run and m.tags["arch"] == "small_cnn"
    assert m.params == {"method": "natural", "dataset": "digits", "arch": "small_cnn", "eps": str(EPS),
                        "step_size": str(STEP), "attack_steps": "10"}
    info = Model.load(os.path.join(m.artifact_location, "MLmodel"))
    assert info.metadata == {"dataset": "digits", "arch": "small_cnn", "num_classes": 10, "in_shape": [1, 8, 8],
                             "eps": EPS, "step_size": STEP, "attack_steps": 10, "value_range": [0.0, 1.0],
                             "method": "natural", "best_epoch": 3, "selected_by": "val/clean_acc",
                             "raydistill_checkpoint": "extra_files/model.pt"}
    assert info.flavors["pytorch"]["extra_files"] == [{"path": "extra_files/model.pt"}]
    assert info.flavors["python_function"]["pickle_module_name"] == "mlflow.pytorch.pickle_module"  # the network pickled
    sig = info.signature.to_dict()
    assert '"shape": [-1, 1, 8, 8]' in sig["inputs"] and '"shape": [-1, 10]' in sig["outputs"]
    assert info.saved_input_example_info["type"] == "ndarray"
    assert {x.key: x.value for x in m.metrics} == {f"test/{k}": v for k, v in acc.items()}  # the test figures
    assert open(os.path.join(m.artifact_location, "extra_files", "model.pt"), "rb").read() == \
        (ck / "model.pt").read_bytes()


def test_registered_model_and_evaluate_of_runs_and_models_uris(logged, tmp_path):
    uri, run_id, ck, acc = logged
    other = tracking.open_run(uri, "raydistill", "nat-s1", tracking.KIND_RUN, tags={"method": "natural"})
    candidates = {"natural": [{"mlflow_run_id": other, "seed": 1, "metrics": {"aa_acc": 0.1, "pgd20_acc": 0.9}},
                              {"mlflow_run_id": run_id, "seed": 0, "metrics": {"aa_acc": 0.2, "pgd20_acc": 0.3}}]}
    assert tracking.register_best(uri, "tiny", candidates) == {"natural": "models:/tiny-natural/1"}
    assert tracking.register_best(uri, "tiny", candidates) == {"natural": "models:/tiny-natural/1"}  # resumed: kept
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    (v,) = c.search_model_versions("name = 'tiny-natural'")
    assert v.run_id == run_id and v.tags == {"method": "natural", "seed": "0", "selected_by": "aa_acc",
                                          "aa_acc": "0.2000", "pgd20_acc": "0.3000"}
    assert c.get_registered_model("tiny-natural").tags == {"study": "tiny", "method": "natural"}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAYDISTILL_CACHE": str(tmp_path / "cache")}
    def run(*argv: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "raydistill.evaluate", *argv, "--tracking-uri", uri], text=True,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    good = {src: run(src, "--attacks", "clean,pgd20", "--n-examples", str(N), "--storage-path", str(tmp_path / src[:4]),
                     "--summary-json", str(tmp_path / f"{src[:4]}.json"), "-q")
            for src in (f"runs:/{run_id}", "models:/tiny-natural/1")}
    bad = {"checkpoint runs:/0123/model: no MLflow model there": run("runs:/0123/model"),
           "checkpoint models:/tiny-natural/7: no MLflow model there": run("models:/tiny-natural/7")}
    for src, p in good.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        s = json.loads((tmp_path / f"{src[:4]}.json").read_text())
        assert s["checkpoint"] == src and s["metrics"] == acc and s["eps"] == EPS and s["dataset"] == "digits"
        assert f"checkpoint  {src} (small_cnn)" in out
    for needle, p in bad.items():
        _, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: " + needle), err[-3000:]
