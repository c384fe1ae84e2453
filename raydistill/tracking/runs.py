"""The MLflow store and its runs: open a store, start a run (find-or-create by name and kind), close
it with a status and reason, find runs by kind, parent and name, log to them."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import UsageError, first_line
from ..storage import in_ray_session

NAME_TAG = "raydistill.name"  # the --name of a training run or search, or a report's / evaluation's name
KIND_TAG = "raydistill.kind"  # what a run is: one of the KIND_* values
PARENT_TAG = "mlflow.parentRunId"  # a trial's search run (MLflow's own nesting tag)
RUN_NAME_TAG = "mlflow.runName"
FAILURE_TAG = "failure_reason"  # why a FAILED or KILLED run ended
KIND_RUN = "run"  # a training run (raydistill.train, or a tune trial)
KIND_SEARCH = "search"  # a tune search: parent of its trials' runs
KIND_REPORT = "report"  # a report's outputs (raydistill.report --log-to-mlflow without a search)
KIND_EVAL = "eval"  # a raydistill.evaluate run
STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow 3 opens an experiment without this tag on its GenAI (traces) overview; "custom_model_development"
# makes the UI open on the runs table, as for a model-training experiment
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


OFF = "none"  # --tracking-uri none: no MLflow at all (train, evaluate); MLflow is not even imported
# ============================================================================= store
def is_off(uri: str | None) -> bool:
    """Whether ``uri`` turns tracking off (``--tracking-uri none``, any case): nothing is logged and
    MLflow is not imported, so the command runs where MLflow is not installed."""
    return uri is not None and uri.strip().lower() == OFF


SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # a URI's scheme (two letters at least: not a drive)
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores (dialect[+driver]://...)
ACCEPTED = ("sqlite:///FILE, a database (postgresql://, mysql://, mssql://), an MLflow server http(s)://HOST:PORT, "
            "databricks, a folder (its mlflow.db), or none (train and evaluate: no tracking)")
DB_FILE = "mlflow.db"  # a folder given as the store: MLflow 3 refuses folder (file) stores, its sqlite database there
_noted: set[str] = set()


def resolve_uri(uri: str | None) -> str:
    """``uri`` (else MLFLOW_TRACKING_URI, else MLflow's own default) made absolute: the one check of a tracking URI.

    Accepted: ``sqlite:///FILE`` and MLflow's other SQLAlchemy databases, ``http(s)://`` (an MLflow server),
    ``databricks``, and a folder or ``file:`` URI, taken as ``sqlite:///<folder>/mlflow.db`` with one ``note:``
    line on stderr (the classic ``--tracking-uri ./mlruns``; MLflow 3 refuses folder stores). Anything else (an
    unknown scheme, a file that is not a ``sqlite:///`` URI) is a UsageError naming the value and these forms.
    Tracking off (``none``) is a UsageError here too: the commands that accept it (train, evaluate) test
    :func:`is_off` before resolving."""
    if is_off(uri):
        raise UsageError("--tracking-uri none turns MLflow off, which only train and evaluate accept; "
                         "this command needs an MLflow store: give its URI or leave the option out")
    source = f"--tracking-uri {uri}"
    if not uri:
        env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if env:
            uri, source = env, f"MLFLOW_TRACKING_URI={env}"
        else:
            import mlflow

            uri = mlflow.get_tracking_uri()
    uri = uri.strip()
    m = SCHEME.match(uri)
    scheme = m.group(1).lower() if m else None
    if uri.lower() == "databricks" or scheme in ("databricks", "http", "https"):
        return uri
    if scheme is not None and scheme.split("+")[0] in DATABASES:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + os.path.abspath(os.path.expanduser(uri[len("sqlite:///"):]))
        check_outside_ray_session(uri)
        return uri
    if scheme is None:
        folder = uri
    elif scheme == "file":
        from urllib.parse import unquote, urlparse

        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise UsageError(f"{source}: a file: URI names a folder of this machine (file:///PATH), not of host "
                             f"'{parsed.netloc}'; accepted: {ACCEPTED}")
        folder = unquote(parsed.path)
    else:
        raise UsageError(f"{source}: unknown scheme '{scheme}:'; accepted: {ACCEPTED}")
    path = os.path.abspath(os.path.expanduser(folder))
    if os.path.isfile(path):
        raise UsageError(f"{source} is a file, not a folder; for an MLflow database file give sqlite:///{path}; "
                         f"accepted: {ACCEPTED}")
    uri = "sqlite:///" + os.path.join(path, DB_FILE)
    check_outside_ray_session(uri)
    if source not in _noted:
        _noted.add(source)
        old = _holds_file_store(path) and not os.path.exists(os.path.join(path, DB_FILE))
        print(f"note: {source} is a folder: MLflow 3 keeps no runs in folders, so they are in its database {uri}"
              + (f" (the folder's older runs: `mlflow migrate-filestore --source {path} --target {uri}` moves them "
                 "there)" if old else ""), file=sys.stderr, flush=True)
    return uri


def _holds_file_store(path: str) -> bool:
    """Whether folder ``path`` holds runs of MLflow's file store (an experiment folder with its meta.yaml)."""
    try:
        return any(os.path.isfile(os.path.join(path, d, "meta.yaml")) for d in os.listdir(path))
    except OSError:
        return False


def check_outside_ray_session(uri: str) -> None:
    """Refuse a local store (a sqlite file) inside Ray's temporary session folder: there, as in a
    `ray job submit` job without MLFLOW_TRACKING_URI (MLflow's default store is ./mlflow.db, and the job's
    current folder is Ray's temporary copy of its working directory), the runs would be deleted with it."""
    path = local_path(uri)
    if path is not None and in_ray_session(path):
        raise UsageError(f"the MLflow store {uri} is inside Ray's temporary session folder (a `ray job submit` job "
                         "runs in a temporary copy of its --working-dir), which Ray deletes; give --tracking-uri "
                         "http://HEAD:5000 (the cluster's MLflow server) or a path outside it, or set "
                         "MLFLOW_TRACKING_URI in the environment of `ray start` on every node (docs/clusters.md)")


def local_path(uri: str) -> str | None:
    """The database file of a local store's resolved ``uri`` (sqlite); None for a server or another database."""
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def client(uri: str):
    """MLflow's client on ``uri``: for this package only (every other module goes through its functions)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast (one error line) when a remote tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(f"--tracking-uri {uri} is unreachable ({reason}); start the MLflow server or give another URI") from None


def open_store(uri: str | None) -> str:
    """The resolved ``uri`` of an existing, usable store; else a UsageError (and nothing is created)."""
    uri = resolve_uri(uri)
    path = local_path(uri)
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"--tracking-uri {uri}: no MLflow database at {path}")
    check_reachable(uri)
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as exc:  # any failure of this first query means the store is unusable
        raise UsageError(f"--tracking-uri {uri} is not a usable MLflow store ({first_line(exc)})") from None
    return uri


def experiment_id(c, name: str) -> str:
    """The id of experiment ``name`` on client ``c``, created (or restored) when needed."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return c.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created concurrently by another driver
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def existing_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, which must exist (a UsageError lists the store's experiments)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = sorted(e.name for e in c.search_experiments())
        raise UsageError(f"--experiment {name!r} not found; the store has: {', '.join(names) or 'no experiments'}")
    return exp.experiment_id


# ============================================================================= runs
def find_runs(uri: str, experiment: str, *, kind: str | None = None, parent: str | None = None,
              name: str | None = None) -> list:
    """MLflow's runs of ``experiment`` (a name) with the given kind, parent run id and name, newest first.

    ``kind=KIND_RUN`` also matches training runs logged before runs had a kind (a ``method`` tag, no kind).
    """
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        return []
    wanted = {KIND_TAG: kind if kind != KIND_RUN else None, PARENT_TAG: parent, NAME_TAG: name}
    filt = " and ".join(f"tags.`{tag}` = '{_quote(v)}'" for tag, v in wanted.items() if v is not None)
    runs, token = [], None
    while True:
        page = c.search_runs([exp.experiment_id], filt, max_results=1000, order_by=["attributes.start_time DESC"],
                             page_token=token)
        runs += [r for r in page if kind != KIND_RUN or _is_training_run(r.data.tags)]
        token = page.token
        if not token:
            return runs


def delete_runs(uri: str, run_ids: Iterable[str]) -> None:
    """Delete runs (moved to MLflow's trash): e.g. those of trials that an interrupted search started but never
    recorded, so that a relaunch leaves every trial exactly once."""
    c = client(uri)
    for run_id in run_ids:
        c.delete_run(run_id)


def run_exists(uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client(uri).get_run(run_id)
    except MlflowException:
        return False
    return True


def open_run(uri: str, experiment: str, name: str, kind: str, *, tags: dict[str, str] | None = None,
             params: dict[str, Any] | None = None, parent: str | None = None,
             artifacts: dict[str, str] | None = None, reuse: bool = True) -> str:
    """The id of the newest run of this name and kind, set RUNNING again (``reuse``), else of a new run.

    A new run is tagged with its name, kind and ``parent``, plus ``tags``, and starts with ``params``
    and ``artifacts`` (local file -> artifact folder). The experiment is created when it is missing.
    """
    c = client(uri)
    found = find_runs(uri, experiment, kind=kind, name=name) if reuse else []
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id
    tags = {**(tags or {}), NAME_TAG: name, KIND_TAG: kind, RUN_NAME_TAG: name}
    if parent:
        tags[PARENT_TAG] = parent
    run_id = c.create_run(experiment_id(c, experiment), tags=tags, run_name=name).info.run_id
    if params:
        log_batch(uri, run_id, params=params)
    for path, folder in (artifacts or {}).items():
        c.log_artifact(run_id, path, artifact_path=folder)
    return run_id


def close_run(uri: str, run_id: str, status: str = "FINISHED", reason: str | None = None,
              tags: dict[str, str] | None = None) -> None:
    """End a run with ``status`` (FINISHED, FAILED or KILLED), after setting ``tags``.

    ``reason`` becomes its failure_reason tag; a close without a reason drops the one that an earlier
    attempt of the run (a failed launch of the same --name) left. A run that is FINISHED is never
    closed as FAILED or KILLED: another driver (a relaunch with the same --name) finished it while this
    one, stale, was still waiting, and its outcome stands.
    """
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    c = client(uri)
    if status != "FINISHED" and c.get_run(run_id).info.status == "FINISHED":
        return
    for k, v in (tags or {}).items():
        c.set_tag(run_id, k, str(v))
    if reason is not None:
        c.set_tag(run_id, FAILURE_TAG, reason[:5000])
    elif FAILURE_TAG in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, FAILURE_TAG)
    c.set_terminated(run_id, status=status)


def log_batch(uri: str, run_id: str, *, metrics: dict[str, float] | None = None,
              params: dict[str, Any] | None = None, step: int = 0, tags: dict[str, str] | None = None) -> list[str]:
    """Log ``metrics`` at ``step``, ``tags`` and the ``params`` the run lacks; returns the names of those params
    it already had with another value (MLflow never changes a param). A refused request is a UsageError."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    c = client(uri)
    params = {k: str(v) for k, v in (params or {}).items()}
    existing = c.get_run(run_id).data.params if params else {}
    clash = [k for k, v in params.items() if k in existing and existing[k] != v]
    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
    ps = [Param(k, v) for k, v in params.items() if k not in existing]
    ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    batches = [ps[i:i + 100] for i in range(0, len(ps), 100)] or ([[]] if ms or ts else [])  # <= 100 params a request
    try:
        for i, batch in enumerate(batches):
            c.log_batch(run_id, metrics=ms if i == 0 else [], params=batch, tags=ts if i == 0 else [])
    except MlflowException as exc:
        raise UsageError(f"MLflow refused the results for run {run_id}: {first_line(exc)}") from None
    return clash


def log_artifacts(uri: str, run_id: str, paths: Iterable[str | Path], folder: str) -> None:
    c = client(uri)
    for path in paths:
        c.log_artifact(run_id, str(path), artifact_path=folder)


def ui_link(uri: str, experiment: str) -> str:
    """Where the MLflow UI shows ``experiment``'s runs table. MLflow 3.17's UI opens an experiment as its sidebar's
    workflow type says (GenAI by default: its traces overview, no runs); ``workflowType=machine_learning`` opens the
    runs. For a tracking server the whole URL, else the `mlflow ui` command and the page on its default port."""
    exp = client(uri).get_experiment_by_name(experiment)
    page = f"#/experiments/{exp.experiment_id}?workflowType=machine_learning" if exp else "?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def get_runs(uri: str, run_ids: Iterable[str]) -> list:
    """MLflow's run objects of ``run_ids`` (tags, params, latest metrics), in that order."""
    c = client(uri)
    return [c.get_run(i) for i in run_ids]


def metric_history(uri: str, run_id: str, key: str) -> list:
    """Every logged value of ``key`` (objects with ``step``, ``value`` and ``timestamp``)."""
    return client(uri).get_metric_history(run_id, key)


def _is_training_run(tags: dict[str, str]) -> bool:
    return tags.get(KIND_TAG, KIND_RUN) == KIND_RUN and bool(tags.get("method"))


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
