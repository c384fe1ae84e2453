"""MLflow, owned by this package: no other raydistill module imports MLflow's client.

* The driver resolves the tracking URI (``--tracking-uri``, else MLflow's own default:
  MLFLOW_TRACKING_URI, else its local sqlite store) to an absolute one (``resolve_uri``: a folder or ``file:``
  URI is its ``mlflow.db``, with one ``note:`` line; an unknown scheme one ``error:`` line), creates the experiment once
  (concurrent sqlite writers can lock) and the run, and passes the run id to the workers.
* Runs are found by their tags, named here once: ``raydistill.name`` (NAME_TAG), ``raydistill.kind``
  (KIND_TAG: run, search, report, eval) and MLflow's ``mlflow.parentRunId`` (PARENT_TAG). A relaunch
  with the same ``--name`` continues the run of that name and kind instead of starting a second one
  (a resumed run, or a finished one given more epochs).
* A run is closed with its terminal status and, when it failed, the reason (tag ``failure_reason``);
  a close without a reason drops the reason an earlier failed attempt left.
* Rank 0 logs per-epoch metrics with the epoch as the step, exactly once per epoch (``EpochLogger``).
* ``--tracking-uri none`` (``is_off``) turns tracking off for train and evaluate: no run, no MLflow
  import (MLflow is imported lazily, inside the functions that use it, never at module level).

``runs`` holds the store, run and search functions; ``training`` what training runs and searches log; ``models``
the MLflow Models (each run's best checkpoint as the model ``runs:/<run id>/model``), a study's registered models,
and a model URI back to its checkpoint file (evaluate).
"""
from __future__ import annotations

from .runs import (FAILURE_TAG, KIND_EVAL, KIND_REPORT, KIND_RUN, KIND_SEARCH, KIND_TAG, NAME_TAG, OFF, PARENT_TAG,
                   RUN_NAME_TAG, check_reachable, is_off, client, close_run, delete_runs, existing_experiment, experiment_id, find_runs, get_runs,
                   log_artifacts, log_batch, metric_history, open_run, open_store, resolve_uri, run_exists, ui_link)
from .models import MODEL_NAME, is_model_uri, log_model, model_checkpoint, register_best
from .training import EpochLogger, log_checkpoint, log_curves, log_resolved, repair_trial, start_run, start_search

__all__ = ["FAILURE_TAG", "KIND_EVAL", "KIND_REPORT", "KIND_RUN", "KIND_SEARCH", "KIND_TAG", "NAME_TAG", "OFF", "PARENT_TAG",
           "RUN_NAME_TAG", "MODEL_NAME", "EpochLogger", "check_reachable", "is_off", "client", "close_run", "delete_runs", "existing_experiment",
           "experiment_id", "find_runs", "get_runs", "log_artifacts", "log_batch", "log_checkpoint", "log_curves",
           "log_resolved", "is_model_uri", "log_model", "metric_history", "model_checkpoint", "open_run", "open_store", "register_best", "repair_trial", "resolve_uri", "run_exists",
           "start_run", "start_search", "ui_link"]
