"""``python -m raydistill.evaluate CHECKPOINT``: robust accuracy of a checkpoint on a test split.

CHECKPOINT is a raydistill checkpoint folder (or its model.pt), local or in remote storage (s3://, gs://:
read through raydistill.storage's cache), an MLflow model of a training run (``runs:/RUN_ID/model`` or
``runs:/RUN_ID``, ``models:/NAME/VERSION`` of the Model Registry: the checkpoint file it holds, downloaded from
the store of ``--tracking-uri``), or an external state_dict file
together with ``--arch``, ``--num-classes`` and ``--dataset``. eps, step size, dataset and data folder
default to the values the checkpoint was trained with (else 8/255, eps/4). Every argument is checked
before any data or model is loaded; a bad one prints one ``error:`` line and exits with code 2.

Example::

    python -m raydistill.evaluate runs/ard/checkpoint --attacks clean,pgd20,aa --n-examples 1000 \\
        --summary-json eval.json --mlflow --tracking-uri sqlite:///mlflow.db
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from . import evalrun, plugins, provenance, storage
from .checkpoint import FORMAT, safe_load
from .cli import ArgParser, nonneg_float, nonneg_int, positive_float, positive_int
from .errors import UsageError, cli_entry
from .evalpool import WorkersUnavailable
from .evaluation import ATTACKS, DEFAULT_ATTACKS, parse_attacks

DEFAULT_EPS = 8 / 255


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m raydistill.evaluate",
                  description="Evaluate a checkpoint's clean and adversarial (L-inf; cw2: L2) test accuracy.")
    p.add_argument("checkpoint", help="raydistill checkpoint folder or model.pt, an MLflow model (runs:/RUN_ID/model, "
                   "models:/NAME/VERSION; from --tracking-uri's store), or an external state_dict file")
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS),
                   help=f"comma-separated subset of {', '.join(ATTACKS.names())} (default {','.join(DEFAULT_ATTACKS)})")
    p.add_argument("--eps", type=nonneg_float, help="L-inf radius in [0,1] pixel scale, e.g. 8/255 (default: the training eps; cw2 ignores it)")
    p.add_argument("--step-size", type=nonneg_float, help="PGD/CW step (default: the training step size, else eps/4)")
    p.add_argument("--n-examples", type=positive_int, help="evaluate the first N test examples (default all)")
    p.add_argument("--dataset", help="dataset name (default: the checkpoint's)")
    p.add_argument("--data-dir", help="dataset folder, or a URI of one (default: the checkpoint's)")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="images per batch, the unit of work and of resumption (default 256); the results do not "
                        "depend on --workers, only on this")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cuda when present)")
    p.add_argument("--arch", help="architecture of an external state_dict (or a check of the checkpoint's)")
    p.add_argument("--num-classes", type=positive_int, help="class count of an external state_dict")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the attacks' random starts (default 0)")
    p.add_argument("--workers", type=nonneg_int, default=0,
                   help="Ray workers that share the batches (the cluster in RAY_ADDRESS, else a local Ray instance); "
                        "0 = in this process, without Ray (default)")
    p.add_argument("--gpus-per-worker", type=nonneg_float, help="GPUs per Ray worker (default 1 when the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-worker", type=positive_int,
                   help="CPUs (threads) per Ray worker (default: the cluster's free CPUs shared by the workers, at most one node's)")
    p.add_argument("--worker-wait", type=positive_float, default=600.0,
                   help="seconds to wait for a Ray worker when none can be placed before giving up, the finished batches "
                        "kept (default 600, as training's)")
    p.add_argument("--sanity", action="store_true",
                   help="gradient-masking checks: also run PGD-10/50/100, PGD-100 at eps 1.0, AutoAttack and a zero-gradient "
                        "check; one warning: line per failed check and exit code 1")
    p.add_argument("--storage-path", help="where per-image results are kept (default $RAYDISTILL_STORAGE, else "
                                          "~/ray_results): <storage>/evaluations/<name>; a folder or s3://, gs:// URI")
    p.add_argument("--name", help="evaluation name (default: the checkpoint's name and a digest of the model and the "
                                  "settings); relaunching the same evaluation continues it")
    p.add_argument("--summary-json", help="write the results as JSON to this file")
    p.add_argument("--mlflow", action="store_true", help="log test/<attack>_acc to MLflow (a new run unless --run-id)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (implies --mlflow): sqlite:///FILE, http(s)://HOST:PORT, "
                   "databricks or a folder (its mlflow.db); none = no MLflow logging at all")
    p.add_argument("--run-id", help="log into this existing MLflow run (implies --mlflow)")
    p.add_argument("--experiment", default="raydistill", help="MLflow experiment of a new run (default raydistill)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    plugins.add_option(p)
    return p


def _device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device '{text}' is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} GPU(s) present")
    elif device.type != "cpu":
        raise UsageError(f"--device '{text}' is not supported; use cpu, cuda or cuda:N")
    return device


def _mlflow_target(args) -> tuple[str, str | None] | None:
    """(tracking uri, run id or None) when MLflow logging was asked for; checks the run exists."""
    from . import tracking  # MLflow itself is imported only when something is logged

    if tracking.is_off(args.tracking_uri):
        if args.mlflow or args.run_id:
            raise UsageError("--tracking-uri none turns MLflow off; it cannot go with --mlflow or --run-id")
        return None
    if not (args.mlflow or args.tracking_uri or args.run_id):
        return None

    uri = tracking.resolve_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    if args.run_id and not tracking.run_exists(uri, args.run_id):
        raise UsageError(f"--run-id {args.run_id}: no such MLflow run at {uri}")
    return uri, args.run_id


def _log_mlflow(target: tuple[str, str | None], experiment: str, summary: dict, per_image: str | None) -> str:
    from . import tracking

    uri, run_id = target
    new_run = run_id is None
    if new_run:
        run_id = tracking.open_run(uri, experiment, f"evaluate {Path(summary['checkpoint']).name}", tracking.KIND_EVAL,
                                   tags={"raydistill.command": "evaluate", "dataset": summary["dataset"]}, reuse=False)
    params = {"test/eps": summary["eps"], "test/step_size": summary["step_size"], "test/n_examples": summary["n_examples"],
              "test/attacks": ",".join(summary["attacks"]), "test/checkpoint": summary["checkpoint"][:500]}
    tags = provenance.tags(summary.get("plugins") or {})
    if summary.get("masking_flags") is not None:
        tags["masking_flags"] = ",".join(summary["masking_flags"]) or "none"
    clash = tracking.log_batch(uri, run_id, metrics=mlflow_metrics(summary), params=params, tags=tags or None)
    if clash:
        print(f"note: run {run_id} already had {', '.join(clash)} from an earlier evaluation; kept those params")
    if per_image is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "per_image.parquet"
            local.write_bytes(storage.read_bytes(per_image))
            (Path(tmp) / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")
            tracking.log_artifacts(uri, run_id, [local, Path(tmp) / "evaluation.json"], "evaluation")
    if new_run:
        tracking.close_run(uri, run_id, "FINISHED")
    return run_id


def _table(summary: dict) -> str:
    eps, step = summary["eps"], summary["step_size"]
    lines = [f"checkpoint  {summary['checkpoint']} ({summary['arch']})",
             f"dataset     {summary['dataset']} test, {summary['n_examples']} examples",
             f"eps         {eps:.6g} ({eps * 255:.4g}/255), step {step:.6g} ({step * 255:.4g}/255)",
             "", f"{'attack':<12} {'accuracy':>9}"]
    lines += [f"{k[:-4]:<12} {100 * v:8.2f}%" for k, v in summary["metrics"].items()]
    for name, acc in summary.get("aa_components", {}).items():
        lines.append(f"  after {name:<6} {100 * acc:7.2f}%  ({summary['aa_fooled'][name]} images fooled first by it)")
    if summary.get("worst_acc") is not None:
        lines.append(f"{'worst case':<12} {100 * summary['worst_acc']:8.2f}%  (per image, over {', '.join(summary['worst_over'])})")
    if summary.get("sanity"):
        lines.append("")
        lines.append("sanity      " + ("FAILED: " + ", ".join(summary["masking_flags"]) if summary["masking_flags"]
                                      else "passed (no sign of gradient masking)"))
    if summary.get("per_image"):
        lines.append(f"per image   {summary['per_image']}")
    return "\n".join(lines)


def default_name(checkpoint: str, spec: evalrun.EvalSpec) -> str:
    """``<run>-<checkpoint folder>-<digest of the model and settings>``, e.g. ``ard-checkpoint_000010-3fa2c1d9e0``."""
    parts = [p for p in str(checkpoint).replace("://", "/").rstrip("/").split("/") if p]
    if parts and parts[-1].endswith((".pt", ".pth")):
        parts[-1] = parts[-1].rsplit(".", 1)[0]
        if parts[-1] in ("model", "last_model"):
            parts = parts[:-1]
    label = "-".join(parts[-2:]) if len(parts) >= 2 else (parts[-1] if parts else "model")
    label = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label)[-60:]
    return f"{label}-{spec.key()}"


def run_evaluation(checkpoint: str, model: torch.nn.Module, data, attacks: list[str], *, eps: float, step_size: float,
                   n_examples: int | None = None, batch_size: int = 256, seed: int = 0, workers: int = 0,
                   gpus_per_worker: float | None = None, cpus_per_worker: int | None = None, worker_wait: float = 600.0,
                   device: torch.device | None = None, sanity: bool = False, storage_path: str | None = None,
                   name: str | None = None, dataset: str = "", quiet: bool = False, on_unit=None) -> dict:
    """Evaluate ``model`` (loaded from ``checkpoint``) on ``data``'s test split: every attack's per-image
    results stored as they finish under ``<storage>/evaluations/<name>`` (a relaunch continues), sharded
    over up to ``workers`` Ray workers (0: in this process; as many as the cluster's free resources hold; none
    placeable within ``worker_wait`` seconds: WorkersUnavailable). Returns the summary (see the module's docstring)."""
    from . import sanity as masking
    from .checkpoint import local_file
    from .evaluation import check_settings

    check_settings(eps, step_size, batch_size)
    n = len(data.test_y) if n_examples is None else min(n_examples, len(data.test_y))
    run = list(dict.fromkeys(attacks + (list(masking.ATTACKS) if sanity else [])))
    spec = evalrun.EvalSpec(evalrun.file_sha256(local_file(checkpoint)), dataset, float(eps), float(step_size),
                            int(seed), int(batch_size), int(n))
    folder = storage.join(storage.root(storage_path), "evaluations", name or default_name(checkpoint, spec))
    store = evalrun.ResultStore(folder, spec)
    store.open(checkpoint)
    try:
        evalrun.run_units(store, model, data.test_x, data.test_y, run, workers=workers, gpus_per_worker=gpus_per_worker,
                          cpus_per_worker=cpus_per_worker, worker_wait=worker_wait, device=device, quiet=quiet,
                          on_unit=on_unit)
    except KeyboardInterrupt:
        if not quiet:
            print(f"[evaluate] interrupted: the finished batches are kept in {folder}; run the same command again "
                  f"to continue", file=sys.stderr, flush=True)
        raise
    except WorkersUnavailable as exc:
        raise WorkersUnavailable(f"{exc}; the finished batches are kept in {folder}: the same command continues "
                                 "them") from None
    res = evalrun.combine(store, run, data.test_y)
    per_image = evalrun.write_per_image(store, res)
    threat = [a for a in run if ATTACKS.get(a).threat]
    summary = {"checkpoint": checkpoint, "dataset": dataset, "eps": eps, "step_size": step_size, "n_examples": n,
               "attacks": attacks, "seed": seed, "batch_size": batch_size, "workers": workers,
               "metrics": {f"{a}_acc": res.accuracy[a] for a in attacks},
               "worst_acc": res.worst_acc, "worst_over": threat, "evaluation": folder, "per_image": per_image}
    if res.aa_components:
        summary.update(aa_components=res.aa_components, aa_fooled=res.aa_fooled)
    if sanity:
        white = [a for a in threat if a not in ("clean", "aa")]
        findings, figures = masking.check(res.table, white)
        summary.update(masking_flags=[f.check for f in findings if f.failed], sanity=figures,
                       sanity_messages={f.check: f.message for f in findings})
    return summary


def mlflow_metrics(summary: dict) -> dict[str, float]:
    """A ``run_evaluation`` summary's figures as MLflow metrics: ``test/<attack>_acc``, ``test/worst_acc``,
    ``test/aa_<component>_acc`` and, after --sanity, ``sanity/*``."""
    metrics = {f"test/{k}": v for k, v in summary["metrics"].items()}
    if summary.get("worst_acc") is not None:
        metrics["test/worst_acc"] = summary["worst_acc"]
    metrics.update({f"test/aa_{k.replace('-', '_')}_acc": v for k, v in (summary.get("aa_components") or {}).items()})
    metrics.update({f"sanity/{k}": v for k, v in (summary.get("sanity") or {}).items()})
    return metrics


def evaluate_on_cluster(checkpoint: str, attacks: list[str], *, storage_path: str, name: str,
                        n_examples: int | None = None, eps: float | None = None, step_size: float | None = None,
                        batch_size: int = 256, worker_wait: float = 600.0, quiet: bool = False) -> dict:
    """``run_evaluation`` of one of this project's checkpoints on its dataset's test split, sharded over the Ray
    cluster this driver is connected to (one worker per GPU, else per CPU, as many as are free); eps and step size
    default to the checkpoint's. Tune's top-k AutoAttack and a study's evaluations."""
    import ray

    from .checkpoint import load_model
    from .data import load_dataset

    res = ray.cluster_resources()
    workers = int(res.get("GPU", 0)) or max(1, int(res.get("CPU", 1)))
    model, meta = load_model(checkpoint, "cpu")
    data = load_dataset(meta["dataset"], data_dir=meta.get("data_dir"), val_size=0)
    return run_evaluation(checkpoint, model, data, attacks, eps=meta["eps"] if eps is None else eps,
                          step_size=meta["step_size"] if step_size is None else step_size, n_examples=n_examples,
                          batch_size=batch_size, workers=workers, worker_wait=worker_wait, storage_path=storage_path,
                          name=name, dataset=meta["dataset"], quiet=quiet)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plugins.use(args.plugin)

    # ---- every argument is checked before data or model are loaded
    from .data import DATASETS, load_dataset
    from .models import MODELS

    attacks = parse_attacks(args.attacks)
    device = _device(args.device) if not args.workers else None
    if args.workers and args.device is not None:
        raise UsageError("--device chooses the device of an in-process evaluation; with --workers N each Ray worker "
                         "uses a GPU when it has one (--gpus-per-worker)")
    if (args.gpus_per_worker is not None or args.cpus_per_worker is not None) and not args.workers:
        raise UsageError("--gpus-per-worker and --cpus-per-worker need --workers N (Ray workers)")
    if args.dataset is not None:
        DATASETS.get(args.dataset)
    if args.arch is not None:
        MODELS.get(args.arch)
    path = args.checkpoint if storage.is_remote(args.checkpoint) else Path(args.checkpoint)
    from . import tracking

    if tracking.is_model_uri(args.checkpoint):  # an MLflow model: the checkpoint file it holds, downloaded
        if tracking.is_off(args.tracking_uri):
            raise UsageError(f"checkpoint {args.checkpoint} is an MLflow model; --tracking-uri none cannot read it")
        path = tracking.model_checkpoint(tracking.resolve_uri(args.tracking_uri), args.checkpoint)
    record = safe_load(path, "checkpoint")  # a missing or unreadable file is a UsageError
    ours = isinstance(record, dict) and record.get("format") == FORMAT and "arch" in record
    meta = dict(record.get("meta", {})) if ours else {}
    if ours and args.arch is not None and args.arch != record["arch"]:
        raise UsageError(f"checkpoint '{path}' holds a {record['arch']}, not the {args.arch} that was asked for")
    if ours and args.num_classes is not None and args.num_classes != int(record["num_classes"]):
        raise UsageError(f"checkpoint '{path}' has {record['num_classes']} classes, not the {args.num_classes} asked for")
    if not ours and (args.arch is None or args.num_classes is None or args.dataset is None):
        raise UsageError(f"checkpoint '{path}' is not a raydistill checkpoint; give --arch, --num-classes "
                         f"and --dataset for an external state_dict")
    arch = record["arch"] if ours else args.arch
    del record
    dataset = args.dataset or meta.get("dataset")
    if not dataset:
        raise UsageError(f"checkpoint '{path}' does not record its dataset; give --dataset")
    provenance.require("model", arch, meta, f"checkpoint '{path}'")  # a plugin's: say which plugin is missing
    provenance.require("dataset", dataset, meta, f"checkpoint '{path}'")
    DATASETS.get(dataset)
    eps = args.eps if args.eps is not None else float(meta.get("eps", DEFAULT_EPS))
    if args.step_size is not None:
        step_size = args.step_size
    elif args.eps is None and meta.get("step_size") is not None:
        step_size = float(meta["step_size"])
    else:
        step_size = eps / 4
    if args.summary_json is not None:
        out = Path(args.summary_json)
        if out.is_dir() or (out.parent.exists() and not out.parent.is_dir()):
            raise UsageError(f"--summary-json {out}: not a writable file path")
    mlflow_target = _mlflow_target(args)

    # ---- data, model, evaluation
    from .checkpoint import load_model

    data = load_dataset(dataset, args.data_dir or meta.get("data_dir"), val_size=0)
    if args.num_classes is not None and args.num_classes != data.num_classes:
        raise UsageError(f"--num-classes {args.num_classes} does not match dataset '{dataset}' ({data.num_classes} classes)")
    model, meta = load_model(path, device or "cpu", arch=arch, num_classes=data.num_classes, in_shape=data.in_shape)
    checkpoint = str(path) if storage.is_remote(path) else os.path.abspath(path)
    try:
        summary = run_evaluation(checkpoint, model, data, attacks, eps=eps, step_size=step_size, n_examples=args.n_examples,
                                 batch_size=args.batch_size, seed=args.seed, workers=args.workers,
                                 gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                                 worker_wait=args.worker_wait, device=device, sanity=args.sanity,
                                 storage_path=args.storage_path, name=args.name, dataset=dataset, quiet=args.quiet)
    except WorkersUnavailable as exc:
        print(f"error: evaluation stopped: {exc}", file=sys.stderr)
        return 1
    if tracking.is_model_uri(args.checkpoint):
        checkpoint = args.checkpoint  # the summary, the table and MLflow name the model, not its downloaded file
    summary = {"checkpoint": checkpoint, "arch": arch, **{k: v for k, v in summary.items() if k != "checkpoint"},
               "plugins": meta.get("plugins") or {}}  # the code that trained it (raydistill.provenance)
    print(_table(summary))
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    if mlflow_target is not None:
        run_id = _log_mlflow(mlflow_target, args.experiment, summary, summary["per_image"])
        print(f"logged to MLflow run {run_id}")
    for check in summary.get("masking_flags", []):
        print(f"warning: gradient masking? {summary['sanity_messages'][check]}", file=sys.stderr)
    return 1 if summary.get("masking_flags") else 0


if __name__ == "__main__":
    main()
