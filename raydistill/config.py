"""One config path from the command line to the objects: TrainConfig.

Precedence, lowest to highest: global defaults < dataset defaults < the method's own settings and hyperparameter
defaults < the method's preset for the dataset (the paper's published setting) < ``--preset NAME``
< explicit flags and ``--set NAME=VALUE``. Every value is validated here, before anything is
created, so bad input is one ``error:`` line.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .schedules import Schedule, parse_schedule

DATASET_NAMES = ("cifar10", "cifar100", "tinyimagenet", "digits", "synthetic")

# Per-dataset defaults: the field's standard threat model and a schedule that suits the data size.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar10": dict(eps=8 / 255, step_size=2 / 255, epochs=120, batch_size=128, lr=0.1, lr_milestones=[100, 110]),
    "cifar100": dict(eps=8 / 255, step_size=2 / 255, epochs=120, batch_size=128, lr=0.1, lr_milestones=[100, 110]),
    "tinyimagenet": dict(eps=8 / 255, step_size=2 / 255, epochs=100, batch_size=128, lr=0.1, lr_milestones=[50, 75]),
    "digits": dict(eps=0.1, step_size=0.025, epochs=15, batch_size=64, lr=0.05, lr_milestones=[10, 13],
                   student="small_cnn"),
    "synthetic": dict(eps=8 / 255, step_size=2 / 255, epochs=5, batch_size=64, lr=0.05, lr_milestones=[3, 4],
                      student="small_cnn"),
}

# Named presets (--preset). Method+dataset presets (paper settings) live on each method class.
PRESETS: dict[str, dict[str, Any]] = {
    "quickstart": dict(dataset="digits", student="small_cnn", epochs=8, batch_size=64,
                       lr=0.05, lr_milestones=[6], val_size=200),
}


@dataclass
class TrainConfig:
    """Everything one training run needs; a plain-data object that travels to Ray workers."""

    method: str = "natural"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    dataset_options: dict = field(default_factory=dict)
    val_size: int | None = None
    student: str = "resnet18"
    peer: str | None = None
    teacher: str | None = None
    teacher_arch: str | None = None
    natural_teacher: str | None = None
    natural_teacher_arch: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: list = field(default_factory=lambda: [])
    lr_gamma: float = 0.1
    swa_start: int | None = None
    seed: int = 0
    eps: float = 8 / 255
    step_size: float = 2 / 255
    attack_steps: int = 10
    hp: dict = field(default_factory=dict)
    precision: str = "fp32"
    channels_last: bool = False  # speed features: raydistill.fastpath
    fold_bn: bool = False
    input_grads_only: bool = False
    compile: str = "none"
    workers: int = 1
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    in_process: bool = False
    threads: int | None = None
    max_failures: int = 0
    name: str | None = None
    storage_path: str | None = None
    tracking_uri: str | None = None
    experiment: str = "raydistill"
    mlflow_run_id: str | None = None
    test_attacks: list = field(default_factory=lambda: ["clean", "fgsm", "pgd20"])
    preset: str | None = None
    log_every: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hp"] = {k: (v.to_dict() if isinstance(v, Schedule) else v) for k, v in self.hp.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        cfg = cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})
        cfg.hp = {k: (parse_schedule(v, k) if isinstance(v, dict) else v) for k, v in cfg.hp.items()}
        return cfg

    def run_dir(self) -> str:
        return os.path.join(storage_path(self.storage_path), self.name or "run")


def storage_path(path: str | None) -> str:
    """Where runs and checkpoints live: a local folder or a pyarrow filesystem URI (s3://, gs://)."""
    path = path or os.environ.get("RAYDISTILL_STORAGE") or os.path.join(Path.home(), "ray_results")
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


# ----------------------------------------------------------------------------- hyperparameters
def coerce_hparam(method: str, name: str, value: Any, default: Any, choices: tuple | None) -> Any:
    """Check one method hyperparameter against the type of its default."""
    where = f"--set {name}={value}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{where}: {name} of {method} is a boolean; give true or false")
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            out = int(str(value)) if not isinstance(value, int) else value
        except ValueError:
            raise UsageError(f"{where}: {name} of {method} is an integer; give e.g. {default}") from None
        if choices and out not in choices:
            raise UsageError(f"{where}: {name} of {method} must be one of {', '.join(map(str, choices))}")
        if out < 0:
            raise UsageError(f"{where}: {name} of {method} must be >= 0")
        return out
    if isinstance(default, (float, Schedule)):
        out = parse_schedule(value, name)
        return out
    if isinstance(default, str):
        out = str(value)
        if choices and out not in choices:
            raise UsageError(f"{where}: {name} of {method} must be one of {', '.join(choices)}")
        return out
    raise UsageError(f"{where}: cannot set {name}")


def parse_set(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UsageError(f"--set {item!r} is not NAME=VALUE; e.g. --set tau=5")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ----------------------------------------------------------------------------- the CLI options
def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by train and tune (the contract's list plus extensions)."""
    from .cli import nonneg_float, nonneg_int, positive_float, positive_int

    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"one of {', '.join(DATASET_NAMES)} (default digits)")
    g.add_argument("--data-dir", help="folder with the dataset files (downloaded there with --download)")
    g.add_argument("--download", action="store_true", help="download CIFAR/TinyImageNet into --data-dir when missing")
    g.add_argument("--val-size", type=nonneg_int, help="held-out validation images from the training split (0: use the test split, as the authors' code does)")
    g = p.add_argument_group("models")
    g.add_argument("--student", help="student architecture")
    g.add_argument("--peer", help="peer architecture of peeraid, and of the teachers at_aka trains (default: the student's)")
    g.add_argument("--teacher", help="robust teacher checkpoint (offline methods)")
    g.add_argument("--teacher-arch", help="architecture of an external --teacher state_dict")
    g.add_argument("--natural-teacher", help="naturally trained teacher checkpoint (akd2, iad2)")
    g.add_argument("--natural-teacher-arch", help="architecture of an external --natural-teacher state_dict")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int)
    g.add_argument("--batch-size", type=positive_int, help="global batch size (split across workers)")
    g.add_argument("--lr", type=nonneg_float)
    g.add_argument("--weight-decay", type=nonneg_float)
    g.add_argument("--lr-milestones", help="comma-separated epochs where the learning rate is multiplied by 0.1")
    g.add_argument("--swa-start", type=nonneg_int, help="average the student's weights from this epoch on")
    g.add_argument("--seed", type=nonneg_int)
    g = p.add_argument_group("threat model")
    g.add_argument("--eps", type=nonneg_float, help="L-inf radius in pixel scale [0,1], e.g. 0.0314")
    g.add_argument("--step-size", type=nonneg_float)
    g.add_argument("--attack-steps", type=positive_int)
    g.add_argument("--set", action="append", metavar="NAME=VALUE", help="a method hyperparameter (repeatable); numbers or schedules linear(a,b,e0,e1) / step(a,b,e)")
    g = p.add_argument_group("scaling and tracking")
    g.add_argument("--workers", type=nonneg_int, help="Ray Train workers (default 1; 0 = in-process, no Ray)")
    g.add_argument("--gpus-per-worker", type=nonneg_float, help="default: 1 if a GPU is present, else 0")
    g.add_argument("--cpus-per-worker", type=positive_float, help="CPUs each worker reserves and uses as threads (default: the cluster's CPUs / workers)")
    g.add_argument("--precision", choices=["fp32", "bf16"], help="fp32 (default) or bf16 autocast with losses in fp32")
    g.add_argument("--preset", help=f"named settings: {', '.join(PRESETS)}")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's own default)")
    g.add_argument("--experiment", help="MLflow experiment name (default raydistill)")
    g.add_argument("--storage-path", help="runs and checkpoints folder or URI (default ~/ray_results)")
    g.add_argument("--max-failures", type=nonneg_int, help="worker-group restarts Ray Train may do (default 0)")
    g.add_argument("--test-attacks", help="final test attacks (default clean,fgsm,pgd20)")
    g.add_argument("--summary-json", help="write the run's summary JSON here")
    from . import fastpath

    fastpath.add_options(p.add_argument_group("speed (the same mathematics; see raydistill.fastpath)"))


def build_config(method: str, args: argparse.Namespace, extra_hp: dict | None = None) -> TrainConfig:
    """Resolve defaults, presets and flags into a validated TrainConfig (raises UsageError)."""
    from .methods import get_method

    cls = get_method(method)
    cfg = TrainConfig(method=method)
    settings: dict[str, Any] = {}
    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(f"unknown preset '{args.preset}'; choose from: {', '.join(PRESETS)}")
    preset = dict(PRESETS.get(args.preset or "", {}))
    dataset = args.dataset or preset.get("dataset") or "digits"
    if dataset not in DATASET_NAMES:
        raise UsageError(f"unknown dataset '{dataset}'; choose from: {', '.join(DATASET_NAMES)}")
    settings.update(DATASET_DEFAULTS[dataset])
    settings.update(cls.settings)
    hp = dict(cls.hparams)
    paper = cls.presets.get(dataset, {})
    hp.update(paper.get("hp", {}))
    settings.update({k: v for k, v in paper.items() if k != "hp"})
    hp.update(preset.pop("hp", {}))
    settings.update(preset)
    flags = {k: getattr(args, k, None) for k in (
        "dataset", "data_dir", "download", "val_size", "student", "peer", "teacher", "teacher_arch",
        "natural_teacher", "natural_teacher_arch", "epochs", "batch_size", "lr", "weight_decay", "swa_start",
        "seed", "eps", "step_size", "attack_steps", "precision", "channels_last", "fold_bn",
        "input_grads_only", "compile", "workers", "gpus_per_worker", "cpus_per_worker", "preset",
        "tracking_uri", "experiment", "storage_path", "max_failures", "name")}
    settings.update({k: v for k, v in flags.items() if v is not None and v is not False})
    if getattr(args, "lr_milestones", None):
        settings["lr_milestones"] = _int_list(args.lr_milestones, "--lr-milestones")
    if getattr(args, "test_attacks", None):
        from .evaluation import parse_attacks
        settings["test_attacks"] = parse_attacks(args.test_attacks)
    settings["dataset"] = dataset
    for k, v in settings.items():
        setattr(cfg, k, v)
    if settings.get("workers") == 0:
        cfg.in_process, cfg.workers = True, 1
    # method hyperparameters: defaults < paper preset < --preset < --set / extra_hp
    given = dict(parse_set(getattr(args, "set", None)))
    given.update(extra_hp or {})
    for name, value in given.items():
        if name not in cls.hparams:
            known = ", ".join(sorted(cls.hparams)) or "none"
            raise UsageError(f"--set {name}: {method} has no hyperparameter '{name}'; it has: {known}")
        hp[name] = value
    cfg.hp = {k: coerce_hparam(method, k, v, cls.hparams[k], cls.choices.get(k)) for k, v in hp.items()}
    if cfg.swa_start == "first_decay":  # PeerAiD / AKD²: average from the first learning-rate decay
        cfg.swa_start = min(cfg.lr_milestones) if cfg.lr_milestones else None
    validate(cfg)
    cls.validate_config(cfg)
    return cfg


def _int_list(text: str, flag: str) -> list[int]:
    try:
        out = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a comma-separated list of epochs, e.g. 100,150") from None
    if any(v < 0 for v in out):
        raise UsageError(f"{flag} {text!r}: epochs must be >= 0")
    return sorted(out)


def validate(cfg: TrainConfig) -> None:
    from .models import MODELS

    MODELS.get(cfg.student)
    if cfg.peer is not None:
        MODELS.get(cfg.peer)
    for flag, value in (("--eps", cfg.eps), ("--step-size", cfg.step_size), ("--lr", cfg.lr)):
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} {value} must be a finite number >= 0")
    if cfg.eps > 1:
        raise UsageError(f"--eps {cfg.eps} is above 1; eps is in pixel scale [0,1], e.g. 0.0314 for 8/255")
    if cfg.batch_size < cfg.workers:
        raise UsageError(f"--batch-size {cfg.batch_size} is smaller than --workers {cfg.workers}; each worker needs at least one image")
    if cfg.name is not None and (not cfg.name or "/" in cfg.name or cfg.name.startswith(".")):
        raise UsageError(f"--name {cfg.name!r} must be a plain folder name (no '/', not starting with '.')")
    for flag, path in (("--teacher", cfg.teacher), ("--natural-teacher", cfg.natural_teacher), ("--data-dir", cfg.data_dir)):
        if path is not None and "://" not in path and not os.path.exists(path) and not (flag == "--data-dir" and cfg.download):
            raise UsageError(f"{flag} '{path}' does not exist")
