"""``python -m raydistill.train METHOD [options]``: one training run.

By default the run goes through Ray Train's TorchTrainer (``--workers N``, each trained network
under DDP); ``--workers 0`` runs the same loop in-process, without Ray, for debugging.
``--tracking-uri none`` turns MLflow off: no run is created (the summary's mlflow_run_id is null).
With both, neither Ray nor MLflow is imported: the run needs only PyTorch and the data libraries.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# Ray reads this when it is imported: without it, it folds progress lines that differ only in numbers
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's preemption watcher, off unless set: its actor (restartable, its arguments in the object store)
# makes every run print an error-level core_worker.cc line (Ray issue 53727). Ray Train passes the variable from
# the process that starts a TorchTrainer (this driver, or a tune trial) to its controller. What the watcher
# would add, and how to keep it: docs/clusters.md, "Quiet output".
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

from . import plugin_ray, plugins, provenance
from .cli import ArgParser
from .config import TrainConfig, add_run_options, build_config
from .errors import USAGE_ERROR_PREFIX, UsageError, cli_entry


class TrainingFailed(RuntimeError):
    """The run started but did not finish; the message is the root cause in one line."""


def parser() -> ArgParser:
    p = ArgParser(prog="python -m raydistill.train", description="Train one model with an adversarial (distillation) method.")
    p.add_argument("method", nargs="?", help="method name (see --list)")
    p.add_argument("--list", action="store_true", help="print the methods, one per line: the name, then where it comes "
                   "from (built-in, or the plugin), and exit")
    plugins.add_option(p)
    add_run_options(p, helps={"tracking_uri": "MLflow tracking URI: sqlite:///FILE, http(s)://HOST:PORT, databricks or a "
                                              "folder (its mlflow.db) (default: MLflow's own default); "
                                              "none = tracking off: no MLflow run, MLflow not imported"})
    return p


def default_name(cfg: TrainConfig) -> str:
    from .userdata import label  # folder:/data/pets -> pets

    return f"{cfg.method}-{label(cfg.dataset)}-{cfg.student}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def preflight(cfg: TrainConfig) -> None:
    """Checks that need files (teacher checkpoints) or run code (a plugin's model and method on 2 images:
    raydistill.plugin_checks): done on the driver before any run exists."""
    from .checkpoint import load_model
    from .data import DATASETS
    from .methods import get_method
    from .plugin_checks import check_config

    check_config(cfg)
    spec = DATASETS.get(cfg.dataset)
    n_classes = spec.num_classes or cfg.dataset_options.get("num_classes", 10)
    shape = spec.in_shape
    for spec in get_method(cfg.method)(cfg).networks():
        if not spec.trainable:
            load_model(spec.checkpoint, "cpu", arch=spec.arch or None, num_classes=n_classes, in_shape=shape,
                       what=spec.flag or spec.name)


def launch(cfg: TrainConfig, *, parent_run_id: str | None = None, callbacks: list | None = None,
           quiet: bool = False, hooks: tuple | list = (), check_storage: bool = True,
           tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cfg`` (validated) to completion and return the summary dict (see CONTRACT.md). ``hooks``
    run inside the loop on every worker (engine.Hooks; picklable objects, importable by the workers).
    ``check_storage``: check that every node reaches the storage first (a search checks it once).
    ``tags``: MLflow tags of the run besides its own (a study's: study, stage, is_final...)."""
    from . import storage, tracking

    p = cfg.placement
    off = tracking.is_off(p.tracking_uri)  # --tracking-uri none: no MLflow run, MLflow not imported
    cfg = replace(cfg, placement=replace(p, name=p.name or default_name(cfg), storage_path=storage.root(p.storage_path),
                                         tracking_uri=tracking.OFF if off else tracking.resolve_uri(p.tracking_uri)))
    preflight(cfg)
    used = provenance.used_by(cfg)  # which code: the plugins' digests, checked against a resumed run's (provenance)
    changes = provenance.check_resume(cfg.placement.run_dir(), used, cfg.placement.allow_changed_plugin,
                                      f"run '{cfg.placement.name}'")
    if not cfg.placement.in_process:
        init_ray(log_to_driver=not quiet)
        if check_storage:
            require_shared_storage(cfg.placement.storage_path)  # before any run exists
    if not off:
        tracking.check_reachable(cfg.placement.tracking_uri)
        run_id = tracking.start_run(cfg, parent_run_id=parent_run_id, tags=tags)
        if used or changes:  # also on a resumed run (start_run reuses it as it was)
            tracking.log_batch(cfg.placement.tracking_uri, run_id, tags=provenance.tags(used, changes))
        cfg = replace(cfg, placement=replace(cfg.placement, mlflow_run_id=run_id))
    provenance.record(cfg.placement.run_dir(), used, changes)
    p = cfg.placement
    t0 = time.time()
    try:
        if p.in_process:
            from .engine import run_in_process

            session = run_in_process(cfg, hooks)
            metrics, checkpoint = session.final_metrics, session.checkpoint_path
        else:
            metrics, checkpoint = run_ray(cfg, callbacks or [], quiet, hooks)
            storage.prune_checkpoints(p.run_dir())  # also folders Ray never registered (a worker died first)
    except BaseException as exc:
        stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))  # Ctrl-C (Ray's own handler turns it into SystemExit)
        reason = "interrupted" if stopped else root_cause(exc)
        try:
            if p.mlflow_run_id:
                tracking.close_run(p.tracking_uri, p.mlflow_run_id, "KILLED" if stopped else "FAILED", reason)
        except Exception:
            pass
        if isinstance(exc, (UsageError, KeyboardInterrupt)):
            raise
        if stopped:
            raise KeyboardInterrupt from exc
        if reason.startswith(USAGE_ERROR_PREFIX):  # bad input that a Ray worker found (e.g. a failed --download)
            raise UsageError(reason[len(USAGE_ERROR_PREFIX):]) from None
        raise TrainingFailed(reason) from exc
    if p.mlflow_run_id:
        if checkpoint:
            tracking.log_checkpoint(p.tracking_uri, p.mlflow_run_id, checkpoint)
        tracking.log_curves(p.tracking_uri, p.mlflow_run_id)
        tracking.close_run(p.tracking_uri, p.mlflow_run_id, "FINISHED")
    return summary(cfg, metrics, checkpoint, time.time() - t0)


def init_ray(**kwargs: Any) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local Ray instance whose workers run at nice 0; with the
    plugins this process loaded shipped to every worker, and the installed ones checked on every node."""
    import ray

    if ray.is_initialized():
        return
    # Ray starts every worker process at nice 15 (its `worker_niceness`), its daemons at 0. The raylet
    # that ray.init starts reads this: the training workers run at 0 like the in-process loop (at 15,
    # every wake-up of GCS, raylet or the dashboard preempts their OpenMP threads; BENCHMARKS.md, Ray's
    # overhead). A value in the environment wins; clusters started with `ray start` need it in that
    # command's environment (clusters/ sets it).
    os.environ.setdefault("RAY_worker_niceness", "0")
    # The raylet warns ("WARNING: 8 PYTHON worker processes have been started ... 4x the maximum expected startup
    # concurrency (2)") once a node has 4x as many worker processes as it starts at once (its CPUs): a search on 2
    # CPUs has that many by design (a trial's function, its Ray Train controller and placement-group cleaner take no
    # CPU; docs/clusters.md, "Quiet output"). Its local instance starts up to 8 at once, so it warns from 32 on.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(8, os.cpu_count() or 1)))
    # A local instance's processes inherit this process's environment while ray.init starts them: its dashboard
    # address, so that Ray Train's PlacementGroupCleaner queries this instance (without it, beside another Ray
    # instance on the machine, its monitor thread dies with a traceback: "Found multiple active Ray instances").
    # Connecting to a cluster starts nothing and ignores the port; the cluster's nodes need RAY_ADDRESS instead.
    local = {}
    if not (os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS")):
        kwargs.setdefault("dashboard_port", free_port())
        local = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{kwargs['dashboard_port']}"}
    else:
        kwargs.setdefault("runtime_env", _job_env())
    os.environ.update(local)
    plugins.load_environment()
    try:  # the plugins' code goes to every worker of every node (py_modules; raydistill.plugin_ray)
        with plugin_ray.init_options(kwargs) as options:
            ray.init(logging_level="ERROR", **options)
    finally:
        for k in local:
            os.environ.pop(k, None)
    plugin_ray.check_nodes()  # an installed plugin that a node lacks: one error line naming the node
    _sigterm_as_ctrl_c()


def _job_env() -> dict:
    """The runtime environment of this driver's job on a cluster: RAY_ADDRESS for its processes (the nodes' own
    environment may lack it), so that Ray Train's PlacementGroupCleaner, which looks the cluster up by it, finds
    this cluster beside other Ray instances on the node (without it its monitor thread dies with "Found multiple
    active Ray instances" and a finished run's placement group stays reserved). Not set where the job's own
    runtime environment (ray job submit) sets it, or for an address that names no cluster (auto, ray://)."""
    import json

    address = os.environ.get("RAY_ADDRESS", "")
    if not address or address in ("auto", "local") or "://" in address:
        return {}
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    if "RAY_ADDRESS" in ((job.get("runtime_env") or {}).get("env_vars") or {}):
        return {}
    return {"env_vars": {"RAY_ADDRESS": address}}


def _sigterm_as_ctrl_c() -> None:
    """SIGTERM (``timeout``, a scheduler's stop, ``kill``) ends a driver as Ctrl-C does: one line, what finished kept,
    instead of the stack dump of Ray's own SIGTERM handler (installed by ray.init). Main thread only."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_shared_storage(root: str) -> None:
    """Storage every node of the connected cluster reaches, checked before any run exists: a node-local
    folder on a cluster of several nodes is refused (Ray would fail at the first checkpoint, the cause in a
    worker's log), and a remote URI is opened from every node (storage.check_nodes_reach: their processes take
    the environment of `ray start`, not this shell's: endpoint and credentials must be there)."""
    import ray

    from . import storage

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not storage.is_remote(root) and storage.in_ray_session(root):
        raise UsageError(f"storage '{root}' is inside Ray's temporary session folder (a `ray job submit` job runs in a "
                         "temporary copy of its --working-dir), which Ray deletes; give an absolute --storage-path "
                         "outside it or s3://BUCKET/PATH, or set RAYDISTILL_STORAGE in the environment of `ray start`")
    if not storage.is_remote(root):
        if len(nodes) > 1 and not os.environ.get("RAYDISTILL_SHARED_FS"):
            raise UsageError(
                f"storage '{root}' is a folder on this node, but the Ray cluster has {len(nodes)} nodes and every "
                "worker writes checkpoints there: shared storage is needed; give --storage-path s3://BUCKET/PATH or "
                "gs://BUCKET/PATH (or set RAYDISTILL_STORAGE in the environment of `ray start`), or set "
                "RAYDISTILL_SHARED_FS=1 if that folder is a shared filesystem mounted on every node")
        return
    storage.check_nodes_reach(root, nodes)


def cpus_each(n: int) -> int:
    """Whole CPUs of the connected Ray cluster per each of ``n`` consumers (at least 1): no oversubscription,
    and no more than one live node has (a worker runs on one node)."""
    import ray

    per_node = max((info["Resources"].get("CPU", 0) for info in ray.nodes() if info["Alive"]), default=1)
    return max(1, int(min(ray.cluster_resources().get("CPU", 1) // n, per_node)))


def run_ray(cfg: TrainConfig, callbacks: list, quiet: bool, hooks: tuple | list = ()) -> tuple[dict, str | None]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .engine import train_worker
    from .watch import RunWatch, fit

    init_ray(log_to_driver=not quiet)
    p = cfg.placement
    gpus = p.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= p.workers else 0.0
    cpus = p.cpus_per_worker or cpus_each(p.workers)
    from . import storage, tracking

    if p.mlflow_run_id:
        tracking.log_resolved(p.tracking_uri, p.mlflow_run_id, {"gpus_per_worker": gpus, "cpus_per_worker": cpus})
    resources = {"CPU": float(cpus)}
    if gpus:
        resources["GPU"] = gpus
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg, "hooks": list(hooks)},  # the frozen config itself (cloudpickled)
        scaling_config=ScalingConfig(num_workers=(p.min_workers, p.workers) if p.elastic else p.workers,
                                     use_gpu=gpus > 0, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=RunConfig(name=p.name, storage_path=p.storage_path,
                             # Ray retries every failure; RunWatch counts them against --max-failures (a lost
                             # node is not one), and ends a run that waits past --worker-wait for its workers
                             failure_config=FailureConfig(max_failures=-1),
                             checkpoint_config=CheckpointConfig(num_to_keep=storage.KEEP_CHECKPOINTS),
                             callbacks=[*callbacks, RunWatch(p, resources)],
                             logging_config=LoggingConfig(log_level="WARNING"),
                             # one copy of each worker print (Ray's print patch would add a second)
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
    )
    result = fit(trainer)  # Ctrl-C stops it within seconds
    if result.error is not None:
        raise result.error
    from .storage import uri_of

    ckpt = result.checkpoint  # its path lacks the URI's scheme (s3://) on remote storage
    return dict(result.metrics or {}), uri_of(p.storage_path, ckpt.path) if ckpt is not None else None


def root_cause(exc: BaseException) -> str:
    """The innermost meaningful message of a (Ray-wrapped) exception, on one line."""
    seen, cur = set(), exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        nxt = cur.__cause__ or getattr(cur, "cause", None) or getattr(cur, "controller_failure", None) or cur.__context__
        if nxt is None or not isinstance(nxt, BaseException):
            break
        cur = nxt
    text = f"{type(cur).__name__}: {cur}" if str(cur) else type(cur).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("NonFiniteLoss", "UsageError", "Error:"):
        for ln in reversed(lines):
            if marker in ln:
                return ln
    return lines[-1] if lines else type(exc).__name__


def summary(cfg: TrainConfig, metrics: dict, checkpoint: str | None, wall: float) -> dict[str, Any]:
    """The run's summary: ``metrics`` holds the test figures of the best checkpoint, the one with the best
    validation accuracy ``selected_by`` names (val/pgd10_acc; natural training: val/clean_acc), which is
    ``val_best_acc``; ``val_best_pgd10_acc`` is that checkpoint's validation PGD-10 accuracy."""
    from . import storage, tracking
    from .methods import selected_by

    test = {k[len("test/"):]: v for k, v in metrics.items() if k.startswith("test/")}
    p = cfg.placement
    return {"method": cfg.method, "dataset": cfg.dataset, "student": cfg.student, "name": p.name,
            "mlflow_run_id": p.mlflow_run_id, "tracking_uri": None if tracking.is_off(p.tracking_uri) else p.tracking_uri,
            "checkpoint": (checkpoint if storage.is_remote(checkpoint) else os.path.abspath(checkpoint)) if checkpoint else None,
            "epochs_completed": int(metrics.get("epochs_completed", 0)),
            "best_epoch": int(metrics.get("best_epoch", 0)),
            "best_is_averaged": bool(metrics.get("best_is_averaged", 0.0)),
            "metrics": test, "selected_by": selected_by(cfg.method), "val_best_acc": metrics.get("val/best_acc"),
            "val_best_clean_acc": metrics.get("val/best_clean_acc"), "val_best_pgd10_acc": metrics.get("val/best_pgd10_acc"),
            "wall_time_s": round(wall, 2), "plugins": provenance.used_by(cfg)}


def print_summary(s: dict[str, Any]) -> None:
    rows = [("method", s["method"]), ("dataset", s["dataset"]), ("student", s["student"]),
            ("epochs", s["epochs_completed"]), ("best epoch", s["best_epoch"]),
            ("best checkpoint", ("weight-averaged student" if s["best_is_averaged"] else "student")
             + f" (by {s.get('selected_by', 'val/pgd10_acc')})")]
    rows += [(k, f"{v:.4f}") for k, v in s["metrics"].items()]
    rows += [("wall time", f"{s['wall_time_s']:.1f}s"), ("checkpoint", s["checkpoint"]),
             ("mlflow run", s["mlflow_run_id"] or "none (tracking off)")]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))


def write_json(path: str, obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, p)


def main(argv: list[str] | None = None, hooks: tuple | list = ()) -> int:
    from .methods import METHODS

    args = parser().parse_args(argv)
    plugins.use(args.plugin)
    if args.list:
        print("\n".join(plugins.listing("method")))
        return 0
    if not args.method:
        raise UsageError(f"give a METHOD; choose from: {', '.join(METHODS.names())}")
    cfg = build_config(args.method, args)
    if args.summary_json:
        out_dir = Path(args.summary_json).expanduser().resolve().parent
        if out_dir.exists() and not os.access(out_dir, os.W_OK):
            raise UsageError(f"--summary-json {args.summary_json}: folder is not writable")
    try:
        s = launch(cfg, hooks=hooks)
    except TrainingFailed as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        return 1
    print_summary(s)
    if args.summary_json:
        write_json(args.summary_json, s)
    return 0


run = cli_entry(main)

if __name__ == "__main__":
    run()
