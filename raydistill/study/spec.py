"""The study file, validated on load into frozen records (docs/studies.md describes it key by key).

:func:`load` checks the file's shape, names, types and ranges, and each error is ONE line naming the
file and the key: ``error: STUDY.yaml: search.sampler: unknown value 'grid'; accepted: tpe, random``.
The configurations of the study's runs are then built by :mod:`raydistill.study.plan` through the one
configuration path (``config.resolve``), which catches a bad ``set:`` name or value at load too.

Relative paths in the file (teacher checkpoints, search spaces, ``train.data_dir``) are read from the
study file's folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import EXPERIMENT_FIELDS, PLACEMENT_FIELDS, PRESETS
from .checks import Where, describe, option, read_yaml

TOP_KEYS = ("study", "dataset", "student", "peer", "threat", "train", "teachers", "methods", "search", "final",
            "evaluation", "estimate", "plugins")
THREAT_KEYS = ("eps", "step_size", "attack_steps")
SCHEDULE_KEYS = ("epochs", "lr", "lr_milestones", "weight_decay", "swa_start")  # per stage, not in train:
# train: every option-table setting that is not the study's own key, a stage's schedule or the command line's
NOT_IN_TRAIN = {"dataset", "student", "peer", "teacher", "teacher_arch", "natural_teacher", "natural_teacher_arch",
                "seed", "test_attacks", "name", "storage_path", "tracking_uri", "allow_changed_plugin", *THREAT_KEYS,
                *SCHEDULE_KEYS}
TRAIN_KEYS = tuple(n for n, f in {**EXPERIMENT_FIELDS, **PLACEMENT_FIELDS}.items()
                   if f.metadata.get("group") and n not in NOT_IN_TRAIN)
TEACHER_ROLES = ("robust", "natural")
TRAINED_TEACHER_KEYS = ("method", "arch", "schedule", "set", "seed")
GIVEN_TEACHER_KEYS = ("checkpoint", "arch")
METHOD_KEYS = ("set", "search_space", "schedule")
SEARCH_KEYS = ("budget", "epochs", "schedule", "sampler", "scheduler", "grace_period", "max_concurrent", "seed")
SAMPLERS, SCHEDULERS = ("tpe", "random"), ("asha", "none")
FINAL_KEYS = ("seeds", "schedule")
EVAL_KEYS = ("attacks", "n_examples", "batch_size", "max_concurrent")
ESTIMATE_KEYS = ("tflops", "gflops", "backward_factor", "aa_robust_fraction", "overhead_s", "attack_passes")
DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20", "cw", "aa")


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher the offline methods share: trained once in the study (``method``) or given (``checkpoint``)."""

    role: str  # robust | natural
    method: str | None = None
    arch: str | None = None  # trained: its architecture (default the student's); given: of an external state_dict
    schedule: dict = field(default_factory=dict)  # overrides of the method's paper preset ({}: the preset)
    hp: dict = field(default_factory=dict)
    seed: int = 0
    checkpoint: str | None = None  # a local path (absolute) or a URI

    @property
    def trained(self) -> bool:
        return self.checkpoint is None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    hp: dict = field(default_factory=dict)  # `set:`: pinned for every run of the method (search and final)
    search_space: str | None = None  # None: search_spaces/METHOD.yaml
    schedule: dict = field(default_factory=dict)  # the final schedule's overrides for this method


@dataclass(frozen=True)
class SearchSpec:
    trial_epochs: int | None  # the budget per method: trial-epochs, or
    device_hours: float | None  # device-hours (converted to trial-epochs by the estimate)
    epochs: int  # of one trial (ASHA may stop it earlier)
    schedule: dict
    sampler: str
    scheduler: str
    grace_period: int
    max_concurrent: int
    seed: int


@dataclass(frozen=True)
class FinalSpec:
    seeds: tuple[int, ...]
    schedule: dict  # {}: each method's paper preset for the dataset


@dataclass(frozen=True)
class EvalSpec:
    attacks: tuple[str, ...]
    n_examples: int | None  # None: the whole test split
    batch_size: int
    max_concurrent: int


@dataclass(frozen=True)
class EstimateSpec:
    tflops: float | None = None  # None: by precision (cost.REFERENCE_TFLOPS)
    gflops: dict = field(default_factory=dict)  # arch -> GFLOPs of one forward of one image at the dataset's size
    backward_factor: float = 2.0
    aa_robust_fraction: float = 0.5
    overhead_s: float = 30.0
    attack_passes: dict = field(default_factory=dict)  # attack -> forward+backward passes per image


@dataclass(frozen=True)
class StudySpec:
    file: str  # as given on the command line (errors name it)
    path: Path
    name: str
    dataset: str
    student: str
    peer: str | None
    threat: dict  # eps / step_size / attack_steps given (the dataset's defaults otherwise)
    train: dict  # option-table settings shared by every run
    teachers: dict  # role -> TeacherSpec
    methods: tuple[MethodSpec, ...]
    search: SearchSpec
    final: FinalSpec
    evaluation: EvalSpec
    estimate: EstimateSpec
    plugins: tuple = ()  # the file's plugins: (.py files resolved against its folder, or module names)

    def where(self, *keys: Any) -> Where:
        w = Where(self.file)
        for k in keys:
            w = w.sub(k)
        return w


def load(path: str | os.PathLike, label: str | None = None) -> StudySpec:
    """Read and check a study file (raises UsageError: one line naming the file and the key).

    First the file's shape, types and ranges (no PyTorch import: a malformed file fails in a blink), then
    the names of methods, datasets, architectures and attacks, then what needs them (teachers' methods).
    """
    p = Path(path)
    label = label or str(path)
    top = Where(label)
    doc = top.mapping(read_yaml(p, label), TOP_KEYS)
    base = p.resolve().parent
    name = top.text(doc, "study", p.stem)
    if "/" in name or name.startswith("."):
        top.sub("study").fail(f"{name!r} is not a plain folder name", "a name without '/', not starting with '.'")
    dataset = top.required(doc, "dataset", "the name of a dataset")
    if isinstance(dataset, str) and dataset.partition(":")[0] in ("folder", "npz"):  # data without code:
        from ..userdata import canonical  # its path relative to the study's folder

        dataset = canonical(dataset, base)
    dataset = top.sub("dataset").name(dataset, "dataset")
    student = top.sub("student").name(top.required(doc, "student", "the name of a model"), "model")
    peer = top.sub("peer").name(doc["peer"], "model") if doc.get("peer") is not None else None

    w = top.sub("threat")
    t = w.mapping(doc.get("threat"), THREAT_KEYS)
    threat = {k: v for k, v in (("eps", w.number(t, "eps")), ("step_size", w.number(t, "step_size")),
                                ("attack_steps", w.integer(t, "attack_steps", low=1))) if v is not None}

    train = _train(top.sub("train"), doc.get("train"), dataset, base)
    methods = _methods(top.sub("methods"), doc.get("methods"), base)
    teachers = _teachers(top.sub("teachers"), doc.get("teachers"), base)
    search = _search(top.sub("search"), doc.get("search"))
    w = top.sub("final")
    f = w.mapping(doc.get("final"), FINAL_KEYS)
    final = FinalSpec(_seeds(w.sub("seeds"), f.get("seeds", 3)), _schedule(w, f, "schedule", SCHEDULE_KEYS, preset=True))

    w = top.sub("evaluation")
    e = w.mapping(doc.get("evaluation"), EVAL_KEYS)
    attacks = tuple(w.sub("attacks").names(e.get("attacks", list(DEFAULT_ATTACKS)), "attack"))
    n = e.get("n_examples", "all")
    if n != "all" and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        w.sub("n_examples").fail(f"{describe(n)} is not a count of test images", "an integer >= 1, or all")
    n_examples = None if n == "all" else n
    evaluation = EvalSpec(attacks, n_examples, w.integer(e, "batch_size", 256, low=1),
                          w.integer(e, "max_concurrent", 1, low=1))
    estimate = _estimate(top.sub("estimate"), doc.get("estimate"))
    plugins = _plugins(top.sub("plugins"), doc.get("plugins"), base)
    top.check_names()
    _check_teacher_methods(top.sub("teachers"), teachers)
    for role, tspec in teachers.items():
        if tspec.checkpoint is not None:
            _check_exists(top.sub("teachers").sub(role).sub("checkpoint"), tspec.checkpoint)
    return StudySpec(label, p, name, dataset, student, peer, threat, train, teachers, methods, search, final,
                     evaluation, estimate, plugins)


# ----------------------------------------------------------------------------- sections
def _plugins(w: Where, value: Any, base: Path) -> tuple:
    """``plugins:``: .py files (relative to the study's folder) or module names, loaded now (their names are then
    known to the rest of the file; raydistill.plugins)."""
    from .. import plugins
    from ..errors import UsageError

    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        w.fail(f"expected a list, got {describe(value)}", "a list of .py files (relative to the study file) or module names")
    out = []
    for i, spec in enumerate(value):
        if not isinstance(spec, str) or not spec.strip():
            w.sub(i).fail(f"{describe(spec)} is not a plugin", "a .py file or a module name")
        try:
            out.append(plugins.use([spec], base=base)[0])
        except UsageError as exc:
            w.sub(i).wrap(exc)
    return tuple(p.source if p.kind == "file" else p.module for p in out)


def _local(path: str, base: Path) -> str:
    """A path of the file (``~`` expanded, relative to the study's folder) or a URI as given."""
    if "://" in path:
        return path
    return str((base / os.path.expanduser(path)).resolve())


def _train(w: Where, value: Any, dataset: str, base: Path) -> dict:
    d = w.mapping(value, TRAIN_KEYS)
    out = {}
    for k, v in d.items():
        f = {**EXPERIMENT_FIELDS, **PLACEMENT_FIELDS}[k]
        out[k] = option(w.sub(k), k, v, f.metadata["parse"], f.metadata["choices"])
    preset = out.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            w.sub("preset").fail(f"unknown preset '{preset}'", ", ".join(PRESETS))
        if PRESETS[preset].get("dataset", dataset) != dataset:
            w.sub("preset").fail(f"preset '{preset}' is for {PRESETS[preset]['dataset']}, the study's dataset is "
                                 f"{dataset}", "a preset of the study's dataset, or none")
    if out.get("workers") == 0:
        w.sub("workers").fail("0 (in-process) cannot run the search: each trial is a Ray Train run",
                              "a count >= 1, or an elastic range MIN-MAX")
    if "data_dir" in out:
        out["data_dir"] = _local(out["data_dir"], base)
    return out


def _schedule(w: Where, d: dict, key: str, keys: tuple, preset: bool = False) -> dict:
    """A stage's schedule: ``preset`` (the method's paper preset for the dataset) or overrides of it."""
    v = d.get(key)
    if v is None or (preset and v == "preset"):
        return {}
    w = w.sub(key)
    accepted = ("preset, or " if preset else "") + "a mapping of " + ", ".join(keys)
    if not isinstance(v, dict):
        w.fail(f"expected {'preset or ' if preset else ''}a mapping, got {describe(v)}", accepted)
    w.mapping(v, keys)
    return {k: option(w.sub(k), k, x, EXPERIMENT_FIELDS[k].metadata["parse"]) for k, x in v.items()}


def _hp(w: Where, value: Any) -> dict:
    """``set:``: hyperparameter -> value (names and values are checked by the configuration, with the method)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        w.fail(f"expected a mapping, got {describe(value)}", "a mapping of hyperparameter -> value")
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, (list, type(None))):
            w.sub(k).fail(f"{describe(v)} is not a hyperparameter value", "a number, true/false, text, or a schedule "
                          "such as 'linear(0,6,0,10)'")
    return dict(value)


def _methods(w: Where, value: Any, base: Path) -> tuple[MethodSpec, ...]:
    if value is None:
        w.fail("missing", "a list of methods, or a mapping method -> {set, search_space, schedule}")
    if not isinstance(value, dict):
        return tuple(MethodSpec(n) for n in w.names(value, "method"))
    if not value:
        w.fail("no method given", "a list of methods, or a mapping method -> {set, search_space, schedule}")
    out = []
    for name, v in value.items():
        mw = w.sub(name)
        mw.name(name, "method")
        d = mw.mapping(v, METHOD_KEYS)
        space = mw.text(d, "search_space")
        out.append(MethodSpec(name, _hp(mw.sub("set"), d.get("set")), _local(space, base) if space else None,
                              _schedule(mw, d, "schedule", SCHEDULE_KEYS)))
    return tuple(out)


def _teachers(w: Where, value: Any, base: Path) -> dict:
    d = w.mapping(value, TEACHER_ROLES)
    out = {}
    for role, v in d.items():
        tw = w.sub(role)
        arch = lambda t: tw.sub("arch").name(t["arch"], "model") if t.get("arch") is not None else None  # noqa: E731
        if isinstance(v, dict) and "checkpoint" in v:
            t = tw.mapping(v, GIVEN_TEACHER_KEYS)
            out[role] = TeacherSpec(role, arch=arch(t), checkpoint=_local(tw.text(t, "checkpoint"), base))
            continue
        t = tw.mapping(v, TRAINED_TEACHER_KEYS, "a mapping {method, arch, schedule, set, seed} or {checkpoint, arch}")
        method = tw.required(t, "method", "a method that trains it (pgd_at, trades; natural for the natural teacher), "
                             "or give checkpoint: PATH_OR_URI")
        out[role] = TeacherSpec(role, tw.sub("method").name(method, "method"), arch(t),
                                _schedule(tw, t, "schedule", SCHEDULE_KEYS, preset=True), _hp(tw.sub("set"), t.get("set")),
                                tw.integer(t, "seed", 0))
    return out


def _check_teacher_methods(w: Where, teachers: dict) -> None:
    """A trained teacher's method trains from scratch without teachers (the natural one: natural)."""
    from ..methods import METHODS
    from ..methods._teachers import OfflineMethod

    trainable = [n for n in METHODS.names() if not issubclass(METHODS.get(n), OfflineMethod)]
    for role, t in teachers.items():
        ok = ["natural"] if role == "natural" else [n for n in trainable if n != "natural"]
        if t.trained and t.method not in ok:
            w.sub(role).sub("method").fail(f"'{t.method}' cannot train the {role} teacher", ", ".join(ok))


def _check_exists(w: Where, path: str) -> None:
    """A given teacher's checkpoint must exist: a local path, or a URI looked up on its storage."""
    from .. import storage
    from ..errors import UsageError

    accepted = "a raydistill checkpoint folder or a .pt/.pth state_dict that exists, local or a URI (s3://, gs://)"
    try:
        found = storage.exists(path) if storage.is_remote(path) else os.path.exists(path)
    except UsageError as exc:
        w.wrap(exc)
    if not found:
        w.fail(f"'{path}' does not exist", accepted)


def _search(w: Where, value: Any) -> SearchSpec:
    if value is None:
        w.fail("missing", "a mapping with budget: {trial_epochs: N} or {device_hours: H}, and epochs")
    d = w.mapping(value, SEARCH_KEYS)
    bw = w.sub("budget")
    b = bw.mapping(w.required(d, "budget", "{trial_epochs: N} or {device_hours: H}"), ("trial_epochs", "device_hours"))
    if len(b) != 1:
        bw.fail("give exactly one of trial_epochs and device_hours", "{trial_epochs: N} or {device_hours: H}")
    trial_epochs = bw.integer(b, "trial_epochs", low=1)
    hours = bw.number(b, "device_hours", positive=True)
    epochs = w.integer(d, "epochs", None, low=1)
    if epochs is None:
        w.sub("epochs").fail("missing", "the epochs of one trial, an integer >= 1")
    if trial_epochs is not None and trial_epochs < epochs:
        bw.sub("trial_epochs").fail(f"a budget of {trial_epochs} trial-epochs is smaller than one trial of "
                                    f"{epochs} epochs", f"at least search.epochs = {epochs}")
    scheduler = w.choice(d, "scheduler", SCHEDULERS, "asha")
    grace = w.integer(d, "grace_period", min(2, epochs), low=1)
    if scheduler == "asha" and grace > epochs:
        w.sub("grace_period").fail(f"{grace} is longer than a trial of {epochs} epochs", f"1 to {epochs}")
    return SearchSpec(trial_epochs, hours, epochs, _schedule(w, d, "schedule", SCHEDULE_KEYS[1:]),
                      w.choice(d, "sampler", SAMPLERS, "tpe"), scheduler, grace,
                      w.integer(d, "max_concurrent", 2, low=1), w.integer(d, "seed", 0))


def _seeds(w: Where, value: Any) -> tuple[int, ...]:
    """``seeds: [0, 1, 2]`` or a count ``seeds: 3`` (= 0, 1, 2)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            w.fail(f"{value} seeds", "a count >= 1 or a list of distinct integers >= 0")
        return tuple(range(value))
    if not isinstance(value, list) or not value:
        w.fail(f"expected a list of seeds, got {describe(value)}", "a count >= 1 or a list of distinct integers >= 0")
    for i, s in enumerate(value):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            w.sub(i).fail(f"{describe(s)} is not a seed", "an integer >= 0")
    dup = [s for i, s in enumerate(value) if s in value[:i]]
    if dup:
        w.fail(f"seed {dup[0]} is listed twice", "distinct seeds")
    return tuple(value)


def _estimate(w: Where, value: Any) -> EstimateSpec:
    d = w.mapping(value, ESTIMATE_KEYS)
    gflops, passes = {}, {}
    for key, kind, out in (("gflops", "model", gflops), ("attack_passes", "attack", passes)):
        kw = w.sub(key)
        m = d.get(key)
        if m is not None and not isinstance(m, dict):
            kw.fail(f"expected a mapping, got {describe(m)}", f"a mapping of {kind} name -> number")
        for k in m or {}:
            kw.sub(k).name(k, kind)
            out[k] = kw.number(m, k, positive=True)
    fraction = w.number(d, "aa_robust_fraction", 0.5)
    if fraction > 1:
        w.sub("aa_robust_fraction").fail(f"{fraction} is above 1", "a fraction in [0, 1]")
    return EstimateSpec(w.number(d, "tflops", positive=True), gflops, w.number(d, "backward_factor", 2.0),
                        fraction, w.number(d, "overhead_s", 30.0), passes)
