"""A study's plan: its stages, their runs and each run's configuration and estimated device-hours.

    teachers  teacher/robust, teacher/natural      trained once (or given as checkpoints), shared
    search    search/METHOD                        one equal budget per method (trial-epochs)
    final     final/METHOD/seedS                   methods x seeds at the final schedule
    evaluation eval/METHOD/seedS                   every final run on the same test images, its attacks
    report    report                               the comparison table

:func:`build_plan` builds every run's TrainConfig through ``config.resolve`` (the one configuration
path), so a bad ``set:`` name or value, or a setting a method cannot run with, fails at load with the
key that gave it. A run keeps its ``flags`` and ``hp`` (resolve's inputs): the runner calls
:meth:`Run.resolve` with the teachers' checkpoints and a trial's (or the search's best) values.
Trained teachers appear in the configurations as ``study://teacher/ROLE`` until then.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import TrainConfig, resolve
from ..errors import UsageError
from .checks import Where
from .cost import CostModel
from .spec import MethodSpec, StudySpec, TeacherSpec

TEACHER_REF = "study://teacher/{role}"  # a trained teacher's checkpoint, until the runner has it
TEACHER_FLAGS = {"robust": ("teacher", "teacher_arch"), "natural": ("natural_teacher", "natural_teacher_arch")}
STAGES = ("teachers", "search", "final", "evaluation", "report")


@dataclass(frozen=True)
class Run:
    """One run of the plan. ``kind``: teacher | search | final | eval | report."""

    key: str
    kind: str
    method: str | None = None
    flags: dict = field(default_factory=dict)  # resolve's option-table values (placement included)
    hp: dict = field(default_factory=dict)  # resolve's hyperparameters (the study's `set:`)
    config: TrainConfig | None = None  # as planned (a search: one trial before its sampled values)
    needs: tuple[str, ...] = ()  # keys of the runs whose results it uses
    device_hours: float = 0.0
    detail: dict = field(default_factory=dict)  # kind-specific (see build_plan)

    def resolve(self, teachers: Mapping[str, str] | None = None, trial: Mapping[str, Any] | None = None) -> TrainConfig:
        """This run's configuration with the trained teachers' checkpoints (``{"teacher/robust": path}``) and a
        search trial's values, or the search's best ones for a final run, on top."""
        flags = dict(self.flags)
        for role, (flag, _) in TEACHER_FLAGS.items():
            if flags.get(flag) == TEACHER_REF.format(role=role):
                flags[flag] = (teachers or {})[f"teacher/{role}"]
        return resolve(self.method, flags, self.hp, trial=trial)


@dataclass(frozen=True)
class Stage:
    name: str
    runs: tuple[Run, ...]

    @property
    def device_hours(self) -> float:
        return sum(r.device_hours for r in self.runs)


@dataclass(frozen=True)
class Plan:
    spec: StudySpec
    name: str
    root: str  # storage root (local folder or URI); the study's runs go under root/name
    tracking_uri: str | None
    stages: tuple[Stage, ...]
    cost: CostModel
    assumptions: tuple[str, ...]

    @property
    def device_hours(self) -> float:
        return sum(s.device_hours for s in self.stages)

    def runs(self) -> list[Run]:
        return [r for s in self.stages for r in s.runs]

    def run(self, key: str) -> Run:
        for r in self.runs():
            if r.key == key:
                return r
        raise KeyError(f"no run '{key}' in the plan of study {self.name}")


# ----------------------------------------------------------------------------- configurations
def _build(spec: StudySpec, method: str, layers: list[tuple[Where, dict]], hp: tuple[Where, dict],
           owner: Where) -> TrainConfig:
    """resolve(method, flags of all layers, hp); a failure is named at the layer that caused it (base flags:
    the threat / train key the message names, else ``owner``)."""
    flags = {k: v for _, layer in layers for k, v in layer.items()}
    try:
        return resolve(method, flags, hp[1])
    except UsageError:
        pass
    so_far: dict = {}
    for i, (where, layer) in enumerate(layers + [(hp[0], {})]):
        so_far.update(layer)
        try:
            resolve(method, so_far, hp[1] if i == len(layers) else {})
        except UsageError as exc:
            message = str(exc)
            if i == 0:
                where = _base_where(spec, owner, message)
            elif i == len(layers) and message.startswith("--set "):  # --set NAME=VALUE: ... -> set.NAME
                name = message[len("--set "):].split(":", 1)[0].split("=", 1)[0]
                where = where.sub(name) if name in hp[1] else where
            where.wrap(exc)
    raise AssertionError("unreachable: resolve failed, then passed")


def _base_where(spec: StudySpec, owner: Where, message: str) -> Where:
    """The key of the study's base settings that a configuration error names (``--eps 2 ...`` -> threat.eps)."""
    flag = message.split()[0] if message.startswith("--") else ""
    key = flag[2:].replace("-", "_")
    if key in spec.threat:
        return spec.where("threat", key)
    if key in spec.train:
        return spec.where("train", key)
    if key in ("student", "peer", "dataset"):
        return spec.where(key)
    return owner


def _base(spec: StudySpec, storage_path: str | None, tracking_uri: str | None, allow_changed_plugin: bool = False) -> dict:
    flags = {"dataset": spec.dataset, "student": spec.student, **spec.threat, **spec.train}
    if allow_changed_plugin:  # its runs, relaunched, resume too (raydistill.provenance)
        flags["allow_changed_plugin"] = True
    if spec.peer:
        flags["peer"] = spec.peer
    if storage_path:
        flags["storage_path"] = storage_path
    if tracking_uri:
        flags["tracking_uri"] = tracking_uri
    return flags


def _teacher_flags(spec: StudySpec, method: str) -> dict:
    """The --teacher / --natural-teacher flags of ``method``: given checkpoints, or the trained ones' references."""
    from ..methods import get_method
    from ..methods._teachers import OfflineMethod

    cls = get_method(method)
    if not issubclass(cls, OfflineMethod):
        return {}
    out = {}
    for role in ("robust", "natural") if cls.uses_natural_teacher else ("robust",):
        t = spec.teachers.get(role)
        if t is None:
            how = "{method: " + ("natural" if role == "natural" else "pgd_at|trades") + ", arch: ARCH} (trained in " \
                  "the study) or {checkpoint: PATH_OR_URI, arch: ARCH}"
            spec.where("methods", method).fail(f"{method} needs the {role} teacher, which the study does not give",
                                               f"teachers.{role}: {how}")
        flag, arch_flag = TEACHER_FLAGS[role]
        out[flag] = TEACHER_REF.format(role=role) if t.trained else t.checkpoint
        if not t.trained and t.arch:
            out[arch_flag] = t.arch
    return out


def teachers_needed(method: str) -> tuple[str, ...]:
    from ..methods import get_method
    from ..methods._teachers import OfflineMethod

    cls = get_method(method)
    if not issubclass(cls, OfflineMethod):
        return ()
    return ("robust", "natural") if cls.uses_natural_teacher else ("robust",)


def _archs(spec: StudySpec, cfg: TrainConfig) -> dict[str, str]:
    """Role -> architecture for the cost of ``cfg``'s step (a given checkpoint without arch: the student's)."""
    def teacher(role: str) -> str:
        t = spec.teachers.get(role)
        return (t.arch if t else None) or cfg.student

    return {"student": cfg.student, "peer": cfg.peer or cfg.student, "teacher": teacher("robust"),
            "teacher_nat": teacher("natural")}


def _schedule_text(spec: StudySpec, cfg: TrainConfig, overrides: dict) -> str:
    """e.g. ``120 epochs, lr 0.01 x0.1 at 75,90,100, wd 0.0035 (preset cifar10 + cifar10/resnet18)``: the
    schedule and where it comes from, the method's preset keys (config.preset_keys) or the dataset's defaults."""
    source = f"preset {' + '.join(cfg.method_presets)}" if cfg.method_presets else "dataset defaults"
    if spec.train.get("preset"):
        source += f" + --preset {spec.train['preset']}"
    if overrides:
        source += " + " + ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else f'{v:g}' if isinstance(v, float) else v}"
                                    for k, v in overrides.items())
    mil = ",".join(map(str, cfg.lr_milestones)) or "none"
    swa = f", SWA from {cfg.swa_start}" if cfg.swa_start is not None else ""
    return f"{cfg.epochs} epochs, lr {cfg.lr:g} x0.1 at {mil}, wd {cfg.weight_decay:g}{swa} ({source})"


# ----------------------------------------------------------------------------- the plan
def build_plan(spec: StudySpec, name: str | None = None, storage_path: str | None = None,
               tracking_uri: str | None = None, allow_changed_plugin: bool = False) -> Plan:
    """The study's stages and runs, every configuration resolved and every run estimated (raises UsageError)."""
    from .. import storage

    cost = CostModel(spec.dataset, spec.estimate)
    base = _base(spec, storage_path, tracking_uri, allow_changed_plugin)
    needed = {role for m in spec.methods for role in teachers_needed(m.name)}
    for role in spec.teachers:
        if role not in needed:
            spec.where("teachers", role).fail(f"no method of the study needs the {role} teacher",
                                              "teachers that the study's offline methods need: "
                                              + (", ".join(sorted(needed)) or "none"))
    stages = [Stage("teachers", tuple(_teacher_run(spec, t, base, cost) for t in spec.teachers.values())),
              Stage("search", tuple(_search_run(spec, m, base, cost) for m in spec.methods))]
    finals = tuple(_final_run(spec, m, seed, base, cost) for m in spec.methods for seed in spec.final.seeds)
    stages.append(Stage("final", finals))
    n = spec.evaluation.n_examples or cost.test_images()
    if n > cost.test_images():
        spec.where("evaluation", "n_examples").fail(
            f"{n} is more than the {cost.test_images()} test images of {spec.dataset}", f"1 to {cost.test_images()}, or all")
    evals = tuple(_eval_run(spec, f, n, cost) for f in finals)
    stages.append(Stage("evaluation", evals))
    stages.append(Stage("report", (Run("report", "report", needs=tuple(e.key for e in evals),
                                       detail={"what": "the papers' table: mean and std over seeds per method"}),)))
    archs = sorted({spec.student, spec.peer or spec.student, *(t.arch or spec.student for t in spec.teachers.values())})
    notes = cost.assumptions(archs)
    assumed = [t.role for t in spec.teachers.values() if not t.trained and not t.arch]
    if assumed:
        notes.append(f"given teacher(s) {', '.join(assumed)} without arch: costed as the student's architecture")
    return Plan(spec, name or spec.name, storage.root(storage_path), tracking_uri, tuple(stages), cost, tuple(notes))


def _teacher_run(spec: StudySpec, t: TeacherSpec, base: dict, cost: CostModel) -> Run:
    key = f"teacher/{t.role}"
    if not t.trained:
        return Run(key, "teacher", detail={"given": t.checkpoint, "arch": t.arch})
    w = spec.where("teachers", t.role)
    arch = t.arch or spec.student
    flags = {**base, "student": arch, "seed": t.seed}
    cfg = _build(spec, t.method, [(w, flags), (w.sub("schedule"), t.schedule)], (w.sub("set"), t.hp), w)
    flags.update(t.schedule)
    return Run(key, "teacher", t.method, flags, dict(t.hp), cfg, (), cost.run_hours(cfg, _archs(spec, cfg)),
               {"arch": arch, "schedule": _schedule_text(spec, cfg, t.schedule)})


def _search_run(spec: StudySpec, m: MethodSpec, base: dict, cost: CostModel) -> Run:
    from .. import search_space

    s, w = spec.search, spec.where("methods", m.name)
    teachers = _teacher_flags(spec, m.name)
    flags = {**base, **teachers, "seed": s.seed}
    layers = [(w, flags), (spec.where("search", "schedule"), {**s.schedule, "epochs": s.epochs})]
    cfg = _build(spec, m.name, layers, (w.sub("set"), m.hp), w)
    flags.update(layers[1][1])
    try:
        space = search_space.load(m.name, m.search_space)
    except UsageError as exc:
        (w.sub("search_space") if m.search_space else w).wrap(exc)
    archs = _archs(spec, cfg)
    epoch = cost.epoch_hours(cfg, archs)
    if s.trial_epochs is not None:
        budget = s.trial_epochs
    else:
        budget = int(s.device_hours / epoch)
        if budget < s.epochs:
            spec.where("search", "budget", "device_hours").fail(
                f"{s.device_hours:g} device-hours buy {budget} trial-epochs of {m.name} ({epoch:.3g} device-hours each "
                f"by the estimate), less than one trial of {s.epochs} epochs",
                f"at least {epoch * s.epochs:.3g} device-hours for {m.name}")
    trials = budget // s.epochs
    most = budget // s.grace_period if s.scheduler == "asha" else trials
    finish = cost.run_hours(cfg, archs, epochs=0)  # each trial that completes: its test attacks + overhead
    return Run(f"search/{m.name}", "search", m.name, flags, dict(m.hp), cfg,
               tuple(f"teacher/{r}" for r in teachers_needed(m.name) if spec.teachers[r].trained),
               budget * epoch + trials * finish,
               {"trial_epochs": budget, "epochs": s.epochs, "trials": trials, "max_trials": most,
                "sampler": s.sampler, "scheduler": s.scheduler, "grace_period": s.grace_period,
                "max_concurrent": s.max_concurrent, "seed": s.seed, "search_space": str(space.path),
                "epoch_device_hours": epoch})


def _final_run(spec: StudySpec, m: MethodSpec, seed: int, base: dict, cost: CostModel) -> Run:
    w = spec.where("methods", m.name)
    teachers = _teacher_flags(spec, m.name)
    flags = {**base, **teachers, "seed": seed}
    overrides = {**spec.final.schedule, **m.schedule}
    layers = [(w, flags), (spec.where("final", "schedule"), spec.final.schedule), (w.sub("schedule"), m.schedule)]
    cfg = _build(spec, m.name, layers, (w.sub("set"), m.hp), w)
    flags.update(overrides)
    needs = tuple(f"teacher/{r}" for r in teachers_needed(m.name) if spec.teachers[r].trained) + (f"search/{m.name}",)
    return Run(f"final/{m.name}/seed{seed}", "final", m.name, flags, dict(m.hp), cfg, needs,
               cost.run_hours(cfg, _archs(spec, cfg)), {"seed": seed, "schedule": _schedule_text(spec, cfg, overrides)})


def _eval_run(spec: StudySpec, final: Run, n: int, cost: CostModel) -> Run:
    e, cfg = spec.evaluation, final.config
    return Run(final.key.replace("final/", "eval/", 1), "eval", final.method, needs=(final.key,),
               device_hours=cost.eval_hours(cfg.student, e.attacks, n),
               detail={"attacks": list(e.attacks), "n_examples": n, "batch_size": e.batch_size,
                       "max_concurrent": e.max_concurrent, "eps": cfg.eps, "step_size": cfg.step_size})


def study_dir(plan: Plan) -> str:
    from .. import storage

    return storage.join(plan.root, plan.name)


def exists_locally(plan: Plan) -> bool | None:
    """Whether the study's folder exists (None for remote storage: not looked up by a dry run)."""
    from .. import storage

    return None if storage.is_remote(plan.root) else os.path.exists(study_dir(plan))
