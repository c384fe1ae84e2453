"""MLflow Models: a training run's best checkpoint as an MLflow Model, a study's best models in the Model Registry,
and a model URI (``runs:/ID/model``, ``models:/NAME/VERSION``) back to this project's checkpoint file.

* :func:`log_model`: the run's best student as the model ``model`` of its run (the pytorch flavour; MLflow 3's
  logged model, ``runs:/<run id>/model``): the network pickled by ``mlflow.pytorch`` (its classes come from
  raydistill at load time: ``mlflow.pytorch.load_model`` needs raydistill importable, as the Ray workers do),
  an input example (a seeded batch of one image in [0,1]) and the signature inferred from it, and as metadata
  the threat model (eps, step size, attack steps), the value range [0,1], dataset, arch, class count and input
  shape. The raydistill checkpoint file itself travels with it (``extra_files/model.pt``), so that evaluate reads
  a model URI with the safe loader (weights only), never by unpickling.
* :func:`register_best`: a study's best final model of each method (by AutoAttack, else PGD-20) registered as
  version of the registered model ``<study>-<method>`` (tags: method, seed, aa_acc, pgd20_acc).
* :func:`model_checkpoint`: the checkpoint file of a model URI, downloaded, for evaluate.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UsageError, first_line
from .runs import client

MODEL_NAME = "model"  # the logged model's name: runs:/<run id>/model
CHECKPOINT_FILE = "extra_files/model.pt"  # where the raydistill checkpoint file lies inside the model's artifacts
MODEL_URI = re.compile(r"^(runs:/[^/]+(/.*)?|models:/.+)$")


def is_model_uri(text: str) -> bool:
    """Whether ``text`` names an MLflow model (``runs:/ID[/model]``, ``models:/NAME/VERSION``...) rather than a file."""
    return bool(MODEL_URI.match(str(text)))


@contextmanager
def _fluent(uri: str) -> Iterator[None]:
    """MLflow's module-level functions (mlflow.pytorch's log and load) on ``uri``, quietly: no progress bars, no
    warning about pickled networks (a choice, said in the module's docstring); the previous URI restored after."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before, env = getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    log = logging.getLogger("mlflow.pytorch")
    level = log.level
    log.setLevel(logging.ERROR)
    mlflow.set_tracking_uri(uri)  # (it sets MLFLOW_TRACKING_URI too: restored after)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        log.setLevel(level)
        for var, value in (("MLFLOW_TRACKING_URI", env), ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", bar)):
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _requirements() -> list[str]:
    from importlib import metadata

    out = []
    for dist in ("torch", "raydistill"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out


def log_model(uri: str, run_id: str, model_file: str | os.PathLike) -> str:
    """Log the checkpoint file ``model_file`` (a local model.pt) as run ``run_id``'s MLflow Model (module
    docstring); returns the logged model's id. Its metrics are the run's at the last step (the test figures)."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from ..checkpoint import load_model

    model, meta = load_model(model_file, "cpu")
    c = client(uri)
    run = c.get_run(run_id)
    p = run.data.params
    metadata = {"dataset": meta.get("dataset"), "arch": meta["arch"], "num_classes": meta["num_classes"],
                "in_shape": meta["in_shape"], "eps": meta.get("eps"), "step_size": meta.get("step_size"),
                "attack_steps": int(p["attack_steps"]) if "attack_steps" in p else None, "value_range": [0.0, 1.0],
                "method": meta.get("method"), "best_epoch": meta.get("epoch"), "selected_by": meta.get("selected_by"),
                "raydistill_checkpoint": CHECKPOINT_FILE}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    example = torch.rand((1, *meta["in_shape"]), generator=torch.Generator().manual_seed(0)).numpy()
    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    keep = ("method", "dataset", "arch", "eps", "step_size", "attack_steps")
    logged = c.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                   params={k: str(metadata[k]) for k in keep if k in metadata},
                                   tags={"method": str(meta.get("method")), "dataset": str(meta.get("dataset")),
                                         "arch": meta["arch"]})
    step = int(run.data.tags.get("epochs_completed", 0))  # the test figures' step: the model shows them
    with _fluent(uri):
        mlflow.pytorch.log_model(model, name=MODEL_NAME, run_id=run_id, model_id=logged.model_id,
                                 signature=infer_signature(example, np.asarray(out)), input_example=example,
                                 metadata=metadata, pip_requirements=_requirements(), serialization_format="pickle",
                                 extra_files=[str(model_file)], step=step)
    return logged.model_id


def register_best(uri: str, study: str, candidates: dict[str, list[dict]]) -> dict[str, str]:
    """Register each method's best final model: ``candidates`` maps a method to its final runs
    (``{"mlflow_run_id", "seed", "metrics": {"aa_acc", "pgd20_acc", ...}}``: the study's evaluations); the best by
    aa_acc (else pgd20_acc) becomes a version of the registered model ``<study>-<method>`` (created when missing),
    unless that run is registered there already (a resumed study). Returns method -> ``models:/NAME/VERSION``."""
    c = client(uri)
    out = {}
    for method, runs in candidates.items():
        runs = [r for r in runs if r.get("mlflow_run_id")]
        if not runs:
            continue
        key = "aa_acc" if all("aa_acc" in r["metrics"] for r in runs) else "pgd20_acc"
        best = max(runs, key=lambda r: r["metrics"].get(key, -1.0))
        model = next(iter(c.search_logged_models(experiment_ids=[c.get_run(best["mlflow_run_id"]).info.experiment_id],
                                                 filter_string=f"source_run_id = '{best['mlflow_run_id']}' "
                                                               f"AND name = '{MODEL_NAME}'")), None)
        if model is None:
            continue  # a run logged before models were (or with tracking off): nothing to register
        name = f"{study}-{method}"
        if not c.search_registered_models(filter_string=f"name = '{name}'"):
            c.create_registered_model(name, tags={"study": study, "method": method},
                                      description=f"study {study}: the best final {method} model by {key}")
        done = [v for v in c.search_model_versions(f"name = '{name}'") if v.run_id == best["mlflow_run_id"]]
        if done:
            out[method] = f"models:/{name}/{done[0].version}"
            continue
        tags = {"method": method, "seed": str(best.get("seed")), "selected_by": key,
                **{k: f"{best['metrics'][k]:.4f}" for k in ("aa_acc", "pgd20_acc", "clean_acc") if k in best["metrics"]}}
        with _fluent(uri):  # the registry reads the logged model (its source) from the tracking store in use
            v = c.create_model_version(name, source=model.model_uri, run_id=best["mlflow_run_id"], tags=tags,
                                       model_id=model.model_id)
        # the logged model lists its versions (as mlflow.register_model records them: its page links the registry)
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        listed = json.loads(c.get_logged_model(model.model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        c.set_logged_model_tags(model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            listed + [{"name": name, "version": v.version}])})
        out[method] = f"models:/{name}/{v.version}"
    return out


def model_checkpoint(uri: str, model_uri: str) -> Path:
    """The raydistill checkpoint file of MLflow model ``model_uri`` (``runs:/ID`` means ``runs:/ID/model``),
    downloaded into the local cache; a missing model or one without the file is a one-line UsageError."""
    from ..storage import cache_dir

    if re.fullmatch(r"runs:/[^/]+/?", model_uri):
        model_uri = model_uri.rstrip("/") + "/" + MODEL_NAME
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", model_uri.replace(":/", "-")).strip("-")
    dest = cache_dir() / "mlflow" / label
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with _fluent(uri):
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest / "model")))
        except Exception as exc:  # noqa: BLE001 - no such run, model, version or artifact: said in one line
            shutil.rmtree(dest, ignore_errors=True)
            raise UsageError(f"checkpoint {model_uri}: no MLflow model there in {uri} ({first_line(exc)}); give "
                             "runs:/RUN_ID/model, models:/NAME/VERSION or a checkpoint folder") from None
    found = local / CHECKPOINT_FILE
    if not found.is_file():
        shutil.rmtree(dest, ignore_errors=True)
        raise UsageError(f"checkpoint {model_uri}: the MLflow model holds no raydistill checkpoint file "
                         f"({CHECKPOINT_FILE}); give the run's checkpoint folder instead")
    os.replace(found, dest / "model.pt")
    shutil.rmtree(dest / "model", ignore_errors=True)
    return dest / "model.pt"
