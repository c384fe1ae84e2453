"""One configuration path from the command line, a study or a search trial to the objects.

Two frozen records:

* :class:`TrainConfig`, the experiment: what is trained and how (data, networks, schedule, threat
  model, the method's hyperparameters, speed features). It holds
* :class:`Placement`, where and under which name it runs and is tracked (Ray workers, storage,
  MLflow). The launcher fills it once, with ``dataclasses.replace``.

The two records' fields ARE the option table: each field's metadata gives its flag group, its
parser (type and valid range) and its help, so the command-line parsers of train and tune
(:func:`add_run_options`), the defaults, the types and the coercion of every layer come from one
place. :func:`resolve` merges the layers once, lowest to highest:

    global defaults (the fields) < dataset defaults (``data.DATASETS``) < the method's settings and
    hyperparameter defaults < the method's paper preset for the dataset < its preset for the dataset
    and student architecture ("cifar10/wrn34_10", where the paper says so) < ``--preset NAME``
    < explicit flags and ``--set NAME=VALUE`` < a search trial's sampled values

(:func:`preset_keys`; the configuration records the method's preset keys it got, ``method_presets``)

and checks every value (types, ranges, names, files) before anything is created, so bad input is
one ``error:`` line.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from . import cli
from .choices import COMPILE_MODES, DEFAULT_TEST_ATTACKS, PRECISIONS, parse_attacks
from .errors import UsageError
from .schedules import Schedule, parse_schedule, resolve_fractions

# Named presets (--preset). Method+dataset presets (paper settings) live on each method class.
PRESETS: dict[str, dict[str, Any]] = {
    "quickstart": dict(dataset="digits", student="small_cnn", epochs=8, batch_size=64,
                       lr=0.05, lr_milestones=[6], val_size=200),
}
# training settings a search may tune beside the method's hyperparameters (name -> search default)
TUNABLE_SETTINGS = {"lr": 0.1, "weight_decay": 5e-4}


def _int_list(text: str, flag: str = "--lr-milestones") -> list[int]:
    try:
        out = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a comma-separated list of epochs, e.g. 100,150") from None
    if any(v < 0 for v in out):
        raise UsageError(f"{flag} {text!r}: epochs must be >= 0")
    return sorted(out)


def _attacks(text: str) -> list[str]:
    return parse_attacks(text)


def opt(default: Any, parse: Callable | None = str, group: str | None = None, help: str = "",
        choices: tuple | None = None, factory: Callable | None = None) -> Any:
    """One row of the option table: a field with its default, parser (type and range), flag group
    (None: no command-line flag) and help. ``parse=bool`` is a switch (``--flag``)."""
    meta = {"parse": parse, "group": group, "help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Placement:
    """Where a run runs and is tracked; filled once by the launcher (train, tune, study, bench)."""

    name: str | None = opt(None, group="run", help="run name; relaunching an interrupted run with the same name resumes it")
    storage_path: str | None = opt(None, group="run", help="runs and checkpoints: a folder, or a URI of shared storage "
                                   "(s3://BUCKET/PATH, gs://...; endpoint and credentials from the standard environment "
                                   "variables); default $RAYDISTILL_STORAGE, else ~/ray_results")
    workers: int = opt(1, cli.worker_count, "run", "Ray Train workers (default 1; 0 = in-process, no Ray), or an elastic range "
                       "MIN-MAX: the run goes on with the workers it has (at least MIN) when a node is lost and grows back "
                       "to MAX when capacity returns; the global batch size stays the same")
    min_workers: int | None = opt(None, None)  # an elastic run's minimum (``workers`` is then its maximum); None: fixed
    worker_wait: float = opt(600.0, cli.positive_float, "run", "seconds a run may wait for the resources of its workers "
                             "(a node lost, a cluster too small) before it gives up, its last checkpoint resumable (default 600)")
    in_process: bool = opt(False, None)
    gpus_per_worker: float | None = opt(None, cli.nonneg_float, "run", "default: 1 if a GPU is present, else 0")
    cpus_per_worker: float | None = opt(None, cli.positive_float, "run", "CPUs each worker reserves and uses as threads (default: the cluster's CPUs / workers)")
    threads: int | None = opt(None, None)  # intra-op threads (default: the worker's CPUs)
    max_failures: int = opt(0, cli.nonneg_int, "run", "worker-group restarts Ray Train may do (default 0)")
    tracking_uri: str | None = opt(None, group="run", help="MLflow tracking URI: sqlite:///FILE, http(s)://HOST:PORT, "
                                   "databricks or a folder (its mlflow.db) (default: MLflow's own default)")
    experiment: str = opt("raydistill", group="run", help="MLflow experiment name (default raydistill)")
    mlflow_run_id: str | None = opt(None, None)
    allow_changed_plugin: bool = opt(False, bool, "run", "resume a run (or search) although a plugin it uses changed since "
                                     "it started (refused otherwise); the change is recorded")

    @property
    def elastic(self) -> bool:
        """Whether the worker count may change during the run (``--workers MIN-MAX``)."""
        return self.min_workers is not None

    def worker_counts(self) -> range:
        """The worker counts the run may train with."""
        return range(self.min_workers if self.elastic else self.workers, self.workers + 1)

    def run_dir(self) -> str:
        """The run's folder or URI (the launcher has made ``storage_path`` absolute)."""
        from .storage import join

        return join(self.storage_path or "", self.name or "run")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run computes with (frozen); ``placement`` says where it runs."""

    method: str = opt("natural", None)
    dataset: str = opt("digits", group="data", help="one of {datasets} (default digits); or your own data: folder:PATH "
                        "(class sub-folders of images) or npz:PATH (arrays x, y), local or s3://, gs:// (docs/extending.md)")
    data_dir: str | None = opt(None, group="data", help="folder with the dataset files, or a URI of one (s3://, gs://) "
                                                         "that each node copies once")
    download: bool = opt(False, bool, "data", "download CIFAR/TinyImageNet/MNIST/Fashion-MNIST into --data-dir when missing "
                                              "(once per node; the other workers wait for it)")
    dataset_options: dict = opt(None, None, factory=dict)
    val_size: int | None = opt(None, cli.nonneg_int, "data", "held-out validation images from the training split (0: use the test split, as the authors' code does)")
    train_size: int | None = opt(None, cli.positive_int, "data", "train on a fixed, stratified subset of N training images "
                                 "(after the validation holdout; default all of them)")
    student: str = opt("resnet18", group="models", help="student architecture")
    peer: str | None = opt(None, group="models", help="peer architecture of peeraid, and of the teachers at_aka trains (default: the student's)")
    teacher: str | None = opt(None, group="models", help="robust teacher checkpoint (offline methods)")
    teacher_arch: str | None = opt(None, group="models", help="architecture of an external --teacher state_dict")
    natural_teacher: str | None = opt(None, group="models", help="naturally trained teacher checkpoint (akd2, iad2)")
    natural_teacher_arch: str | None = opt(None, group="models", help="architecture of an external --natural-teacher state_dict")
    epochs: int = opt(10, cli.positive_int, "optimisation")
    batch_size: int = opt(128, cli.positive_int, "optimisation", "global batch size (split across workers)")
    lr: float = opt(0.1, cli.nonneg_float, "optimisation")
    momentum: float = opt(0.9, None)
    weight_decay: float = opt(5e-4, cli.nonneg_float, "optimisation")
    lr_milestones: list = opt(None, _int_list, "optimisation", "comma-separated epochs where the learning rate is multiplied by 0.1", factory=list)
    lr_gamma: float = opt(0.1, None)
    swa_start: int | None = opt(None, cli.nonneg_int, "optimisation", "average the student's weights from this epoch on")
    seed: int = opt(0, cli.nonneg_int, "optimisation")
    eps: float = opt(8 / 255, cli.nonneg_float, "threat model", "L-inf radius in pixel scale [0,1], e.g. 0.0314")
    step_size: float = opt(2 / 255, cli.nonneg_float, "threat model")
    attack_steps: int = opt(10, cli.positive_int, "threat model")
    hp: dict = opt(None, None, factory=dict)
    precision: str = opt("fp32", group="speed", help="fp32 (default; strict: no TF32 on CUDA), tf32 (TF32 matmuls and convolutions "
                         "on CUDA) or bf16 autocast with losses in fp32; training only: evaluation is strict fp32",
                         choices=PRECISIONS)
    channels_last: bool = opt(False, bool, "speed", "NHWC memory format for the networks (same arithmetic)")
    fold_bn: bool = opt(False, bool, "speed", "attacks in eval() mode run on a BatchNorm-folded copy of the network (same function)")
    input_grads_only: bool = opt(False, bool, "speed", "parameters' requires_grad off while attacking (input gradients only)")
    compile: str = opt("none", group="speed", help="torch.compile the attack's networks, or all forwards and backwards (default none)",
                       choices=COMPILE_MODES)
    test_attacks: list = opt(None, _attacks, "run", "final test attacks (default clean,fgsm,pgd20)",
                             factory=lambda: list(DEFAULT_TEST_ATTACKS))
    preset: str | None = opt(None, group="run", help=f"named settings: {', '.join(PRESETS)}")
    # the method's preset keys resolve() applied, in order ("cifar10", "cifar10/wrn34_10"): set by resolve only
    method_presets: list = opt(None, None, factory=list)
    placement: Placement = opt(None, None, factory=Placement)

    def to_dict(self) -> dict:
        """Plain values (schedules as dicts): for checkpoints and MLflow params."""
        d = dataclasses.asdict(self)
        d["hp"] = {k: (v.to_dict() if isinstance(v, Schedule) else v) for k, v in self.hp.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["hp"] = {k: (parse_schedule(v, k) if isinstance(v, dict) else v) for k, v in d.get("hp", {}).items()}
        p = d.get("placement") or {}
        values["placement"] = Placement(**{k: v for k, v in p.items() if k in {f.name for f in dataclasses.fields(Placement)}})
        return cls(**values)


EXPERIMENT_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
PLACEMENT_FIELDS = {f.name: f for f in dataclasses.fields(Placement)}
GROUPS = ("data", "models", "optimisation", "threat model", "run", "speed")


# ----------------------------------------------------------------------------- the command line
def add_run_options(p: argparse.ArgumentParser, helps: Mapping[str, str] | None = None,
                    only: set[str] | None = None) -> None:
    """The option table's flags (train, tune; ``only`` picks some, as bench does), plus ``--set``
    and ``--summary-json``. ``helps`` overrides a flag's help for one command."""
    from .data import DATASETS

    groups = {g: p.add_argument_group(g) for g in GROUPS}
    for f in list(EXPERIMENT_FIELDS.values()) + list(PLACEMENT_FIELDS.values()):
        meta = f.metadata
        if meta.get("group") is None or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        text = (helps or {}).get(f.name, meta["help"]).replace("{datasets}", ", ".join(DATASETS.names()))
        if meta["parse"] is bool:
            groups[meta["group"]].add_argument(flag, action="store_true", default=None, help=text)
        elif meta["parse"] in (_int_list, _attacks):  # lists: parsed (and checked) when resolved
            groups[meta["group"]].add_argument(flag, help=text)
        else:
            groups[meta["group"]].add_argument(flag, type=meta["parse"], choices=meta["choices"], help=text)
    if only is None:
        groups["optimisation"].add_argument(
            "--set", action="append", metavar="NAME=VALUE",
            help="a method hyperparameter (repeatable); numbers or schedules linear(a,b,e0,e1) / step(a,b,e)")
        groups["run"].add_argument("--summary-json", help="write the run's summary JSON here")


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    """The option-table values given on a command line (not given: absent)."""
    out = {}
    for name, f in list(EXPERIMENT_FIELDS.items()) + list(PLACEMENT_FIELDS.items()):
        if f.metadata.get("group") is None:
            continue
        v = getattr(args, name, None)
        if v is not None and v is not False:
            out[name] = v
    return out


def parse_set(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UsageError(f"--set {item!r} is not NAME=VALUE; e.g. --set tau=5")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def build_config(method: str, args: argparse.Namespace, extra_hp: dict | None = None) -> TrainConfig:
    """A command line's configuration: :func:`resolve` of its flags and ``--set`` values."""
    hp = parse_set(getattr(args, "set", None))
    hp.update(extra_hp or {})
    return resolve(method, flags_of(args), hp)


# ----------------------------------------------------------------------------- the layers
def preset_keys(presets: Mapping[str, Any], dataset: str, student: str) -> list[str]:
    """The keys of a method's ``presets`` that a run on ``dataset`` with ``student`` gets, in the order they
    apply: the dataset's, then the dataset and student architecture's ("cifar10", "cifar10/wrn34_10")."""
    return [k for k in (dataset, f"{dataset}/{student}") if k in presets]


def resolve(method: str, flags: Mapping[str, Any] | None = None, hp: Mapping[str, Any] | None = None,
            trial: Mapping[str, Any] | None = None) -> TrainConfig:
    """Merge the layers into one validated, frozen TrainConfig (raises UsageError).

    ``flags``: option-table values given explicitly (experiment and placement fields); ``hp``: the
    method's hyperparameters given with ``--set`` (text or values); ``trial``: a search trial's
    values (hyperparameters or tunable settings; epoch fractions of schedules allowed), on top.
    """
    from .data import DATASETS
    from .methods import get_method
    from .userdata import canonical

    cls = get_method(method)
    flags, trial = dict(flags or {}), dict(trial or {})
    name = flags.get("preset")
    if name is not None and name not in PRESETS:
        raise UsageError(f"unknown preset '{name}'; choose from: {', '.join(PRESETS)}")
    preset = dict(PRESETS.get(name or "", {}))
    dataset = flags.get("dataset") or preset.get("dataset") or EXPERIMENT_FIELDS["dataset"].default
    below = (DATASETS.get(dataset).defaults, cls.settings, cls.presets.get(dataset, {}), preset)
    student = flags.get("student") or next((layer["student"] for layer in reversed(below) if "student" in layer),
                                           EXPERIMENT_FIELDS["student"].default)
    keys = preset_keys(cls.presets, dataset, student)
    settings: dict[str, Any] = {"method_presets": keys}
    hps: dict[str, Any] = dict(cls.hparams)
    for layer in (DATASETS.get(dataset).defaults, cls.settings, *(cls.presets[k] for k in keys), preset):
        hps.update(layer.get("hp", {}))
        settings.update({k: v for k, v in layer.items() if k != "hp"})
    settings.update({k: v for k, v in flags.items() if k in EXPERIMENT_FIELDS})
    given = dict(hp or {})
    for k, v in trial.items():
        if k in cls.hparams:
            given[k] = v
        elif k in TUNABLE_SETTINGS:
            settings[k] = coerce_setting(k, v)
        else:
            raise UsageError(f"a trial set '{k}', which is neither a hyperparameter of {method} nor one of "
                             f"{', '.join(TUNABLE_SETTINGS)}")
    for k, v in given.items():
        if k not in cls.hparams:
            known = ", ".join(sorted(cls.hparams)) or "none"
            raise UsageError(f"--set {k}: {method} has no hyperparameter '{k}'; it has: {known}")
        hps[k] = v
    for k in ("lr_milestones", "test_attacks"):
        if isinstance(settings.get(k), str):
            settings[k] = EXPERIMENT_FIELDS[k].metadata["parse"](settings[k])
    settings["dataset"] = canonical(dataset)  # folder:PATH / npz:PATH with the path made absolute
    epochs = int(settings.get("epochs", EXPERIMENT_FIELDS["epochs"].default))
    settings["hp"] = {k: coerce_hparam(cls, k, resolve_fractions(v, epochs)) for k, v in hps.items()}
    if settings.get("swa_start") == "first_decay":  # PeerAiD / AKD²: average from the first learning-rate decay
        milestones = settings.get("lr_milestones") or []
        settings["swa_start"] = min(milestones) if milestones else None
    place = {k: v for k, v in flags.items() if k in PLACEMENT_FIELDS}
    if place.get("workers") == 0:
        place.update(in_process=True, workers=1)
    elif isinstance(place.get("workers"), tuple):  # --workers MIN-MAX: elastic
        place["min_workers"], place["workers"] = place["workers"]
    cfg = TrainConfig(method=method, placement=Placement(**place),
                      **{k: v for k, v in settings.items() if k in EXPERIMENT_FIELDS})
    validate(cfg)
    cls.validate_config(cfg)
    return cfg


def coerce_value(method: str, name: str, value: Any) -> Any:
    """One value a search may give: a hyperparameter of ``method`` or a tunable training setting."""
    from .methods import get_method

    cls = get_method(method)
    if name in cls.hparams:
        return coerce_hparam(cls, name, value)
    return coerce_setting(name, value)


def coerce_setting(name: str, value: Any) -> Any:
    """A training setting's value (from a trial or a search space) through the option table's parser."""
    parse = EXPERIMENT_FIELDS[name].metadata["parse"]
    try:
        return parse(str(value))
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{name}={value!r}: {exc}") from None


def coerce_hparam(cls, name: str, value: Any) -> Any:
    """One hyperparameter of method class ``cls``: the type of its default, its choices, its declared range."""
    method, default, choices = cls.name, cls.hparams[name], cls.choices.get(name)
    where = f"--set {name}={value}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{where}: {name} of {method} is a boolean; give true or false")
    if isinstance(default, int):
        try:
            out = int(str(value)) if not isinstance(value, int) else value
        except ValueError:
            raise UsageError(f"{where}: {name} of {method} is an integer; give e.g. {default}") from None
        if choices and out not in choices:
            raise UsageError(f"{where}: {name} of {method} must be one of {', '.join(map(str, choices))}")
    elif isinstance(default, (float, Schedule)):
        out = parse_schedule(value, name)
    elif isinstance(default, str):
        out = str(value)
        if choices and out not in choices:
            raise UsageError(f"{where}: {name} of {method} must be one of {', '.join(choices)}")
        return out
    else:
        raise UsageError(f"{where}: cannot set {name}")
    cls.check_value(name, out)
    return out


def validate(cfg: TrainConfig) -> None:
    from .data import DATASETS
    from .models import check_input
    from .userdata import is_user_data

    shape = DATASETS.get(cfg.dataset).in_shape
    for flag, arch in (("--student", cfg.student), ("--peer", cfg.peer)):
        if arch is not None:
            check_input(arch, shape, f"{flag} on {cfg.dataset}")
    for flag, value in (("--eps", cfg.eps), ("--step-size", cfg.step_size), ("--lr", cfg.lr)):
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} {value} must be a finite number >= 0")
    if cfg.eps > 1:
        raise UsageError(f"--eps {cfg.eps} is above 1; eps is in pixel scale [0,1], e.g. 0.0314 for 8/255")
    p = cfg.placement
    if cfg.batch_size < p.workers:
        raise UsageError(f"--batch-size {cfg.batch_size} is smaller than --workers {p.workers}; each worker needs at least one image")
    uneven = [n for n in p.worker_counts() if cfg.batch_size % n]
    if p.elastic and uneven:  # per-worker batch = global batch / workers, for every count the run may have
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by {', '.join(map(str, uneven))}: with --workers "
                         f"{p.min_workers}-{p.workers} the global batch is split evenly over any count in that range; "
                         f"give a batch size divisible by each, or a narrower range")
    if p.name is not None and (not p.name or "/" in p.name or p.name.startswith(".")):
        raise UsageError(f"--name {p.name!r} must be a plain folder name (no '/', not starting with '.')")
    if p.in_process and "://" in (p.storage_path or os.environ.get("RAYDISTILL_STORAGE") or ""):
        raise UsageError("--workers 0 (in-process) keeps its checkpoints in a local folder; give a local --storage-path "
                         "(or unset RAYDISTILL_STORAGE), or --workers >= 1 for remote storage")
    if cfg.data_dir is not None and is_user_data(cfg.dataset):
        raise UsageError(f"--data-dir is for the named datasets; --dataset {cfg.dataset} names its own location")
    for flag, path in (("--teacher", cfg.teacher), ("--natural-teacher", cfg.natural_teacher), ("--data-dir", cfg.data_dir)):
        if path is not None and "://" not in path and not os.path.exists(path) and not (flag == "--data-dir" and cfg.download):
            raise UsageError(f"{flag} '{path}' does not exist")
