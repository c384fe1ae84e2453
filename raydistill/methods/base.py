"""The method interface: what a distillation method declares, and nothing about the loop.

A method is one small class:

* ``hparams`` / ``choices`` / ``ranges``: its hyperparameters (names as in METHODS.md) with
  defaults, the choices of the string ones (the shared ``bn_mode`` / ``random_start`` /
  ``kl_reduction`` ones are declared once here, SHARED_CHOICES) and the valid range of every
  numeric one (raydistill.hparams); any float may be given a schedule (``linear(...)``, ``step(...)``);
* ``presets``: the paper's (or the authors' code's) published settings, each a dict of training
  settings (``epochs``, ``lr``, ``lr_milestones``, ``weight_decay``, ``swa_start``, ...) and ``hp``
  (hyperparameter values), keyed by a dataset name (``"cifar10"``) or, where a paper gives a setting
  for one student architecture, by ``"DATASET/ARCH"`` (``"cifar10/wrn34_10"``; ARCH is the STUDENT's
  architecture name, ``--student``). A run gets the dataset's preset, then over it the
  ``DATASET/ARCH`` preset of its student when there is one; both lie above the method's ``hparams``
  and ``settings`` and below ``--preset NAME``, explicit flags and ``--set`` (raydistill.config,
  :func:`~raydistill.config.resolve`), and the configuration records which keys it got
  (``method_presets``, e.g. ``["cifar10", "cifar10/wrn34_10"]``; the study's dry-run prints them).
  A plugin method declares its presets the same way, e.g.
  ``presets = {"cifar10": {"epochs": 200, "lr_milestones": [100, 150], "hp": {"tau": 1.0}},
  "cifar10/wrn34_10": {"hp": {"warmup": 5}}}``;
* ``selection``: the validation accuracy that picks the best checkpoint, "pgd10" (every paper's
  protocol, the default) or "clean" (natural training);
* ``networks()``: the networks and their roles (trained from scratch, or frozen pretrained);
* ``inner_max()``: how it makes its adversarial inputs this step;
* ``outer_min()``: its named loss terms (summed by the loop into one backward pass);
* ``diagnostics()``: optional per-sample quantities averaged over the validation set each epoch.

The loop (raydistill.engine) owns devices, DDP, optimizers, schedules, checkpoints and logging.

How a method reaches its networks (one way for each use):

* training forwards: ``nets.student(x)`` (any trained network by name; DDP-wrapped when distributed);
* attacks: the bare modules, only inside ``with self.attacking(nets, names, bn) as modules:``;
* frozen pretrained teachers: constant logits from ``OfflineMethod.frozen(nets, name, x)``, and
  input gradients through them only inside ``attacking()`` (AdaAD).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from .. import attacks, fastpath
from ..errors import UsageError
from ..hparams import Range
from ..losses import REDUCTIONS
from ..schedules import Schedule, value_at

# The choices of the hyperparameters several methods share, declared once: every Method gets those
# of them it has among its hparams (a class's own ``choices`` entry wins). The repos differ in both
# attack settings (METHODS.md): BatchNorm mode while attacking, and the PGD start, uniform in the
# ball or x + 0.001·N(0, 1); and in the KL's reduction, sum over classes / B or mean over B·C.
SHARED_CHOICES: dict[str, tuple] = {"bn_mode": ("eval", "train"), "random_start": ("uniform", "normal"),
                                    "kl_reduction": REDUCTIONS}


# what Method.selection may name: the validation accuracies the loop measures every epoch
SELECTIONS = ("pgd10", "clean")


def attack_hparams(bn_mode: str, random_start: str | None = None) -> dict[str, str]:
    """A method's defaults for the training attack's BatchNorm mode and (PGD methods) random start."""
    return {"bn_mode": bn_mode} if random_start is None else {"bn_mode": bn_mode, "random_start": random_start}


@dataclass
class NetSpec:
    """One network of a method: ``trainable`` ones are trained from scratch under DDP; others are
    frozen pretrained networks loaded from ``checkpoint`` (never DDP-wrapped, no parameter grads)."""

    name: str
    arch: str
    trainable: bool = True
    checkpoint: str | None = None
    flag: str = ""  # the CLI flag that names the checkpoint, for error messages


_ACCESS = ("methods reach bare modules only inside Method.attacking(nets, names, bn), a frozen network's "
           "logits through OfflineMethod.frozen(nets, name, x), and train through nets.<name>(x)")


class Nets:
    """The method's networks. ``nets.student`` (any trained network by name) is the training forward,
    DDP-wrapped when distributed. The bare modules (used by attacks, which take input gradients only
    and so never touch DDP's gradient hooks) and the frozen networks are not attributes: methods get
    them from :meth:`Method.attacking` and ``OfflineMethod.frozen``; the loop (engine, bench) from the
    private ``nets._module(name)``."""

    def __init__(self, wrapped: dict[str, nn.Module], modules: dict[str, nn.Module], specs: list[NetSpec]):
        self._wrapped, self._modules = wrapped, modules
        self.specs = {s.name: s for s in specs}

    def __getattr__(self, name: str) -> nn.Module:
        spec = self.__dict__.get("specs", {}).get(name)
        if spec is not None and spec.trainable:
            return self.__dict__["_wrapped"][name]
        if spec is not None:
            raise AttributeError(f"nets.{name} is a frozen network: {_ACCESS}")
        if name == "raw":
            raise AttributeError(f"nets.raw is not for methods: {_ACCESS}")
        raise AttributeError(name)

    def _module(self, name: str) -> nn.Module:
        """The bare module ``name`` (never DDP-wrapped): for the loop only (state, modes, evaluation)."""
        return self._modules[name]

    def names(self, trainable: bool | None = None) -> list[str]:
        return [n for n, s in self.specs.items() if trainable is None or s.trainable == trainable]


class HP:
    """Attribute view of the hyperparameters at the current (fractional) epoch, which it holds."""

    def __init__(self, values: dict[str, Any], epoch: float = 0.0):
        self._values, self.epoch = values, epoch

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__["_values"]
        if name not in values:
            raise AttributeError(f"no hyperparameter '{name}'")
        return value_at(values[name], self.__dict__["epoch"])


@dataclass
class StepContext:
    """What a step may read: threat model, hyperparameters at this epoch, and a stats sink."""

    eps: float
    step_size: float
    attack_steps: int
    hp: HP
    stats: dict = field(default_factory=dict)

    @property
    def epoch(self) -> float:
        """The (fractional) epoch of this step, held once: by ``hp``, which evaluates the schedules at it."""
        return self.hp.epoch

    @epoch.setter
    def epoch(self, value: float) -> None:
        self.hp.epoch = value

    def record(self, name: str, per_sample: torch.Tensor) -> None:
        """Accumulate a per-sample training statistic, logged per epoch as train/<name>."""
        s, n = self.stats.get(name, (0.0, 0))
        self.stats[name] = (s + per_sample.detach().float().sum(), n + per_sample.numel())


class Method:
    name: ClassVar[str] = ""
    hparams: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple]] = {}
    ranges: ClassVar[dict[str, Range]] = {}  # every int / float hyperparameter's valid values
    # "DATASET" or "DATASET/ARCH" (the student's architecture) -> training settings and "hp" (module docstring)
    presets: ClassVar[dict[str, dict]] = {}
    # training settings the method always starts from, on every dataset (below its presets and flags)
    settings: ClassVar[dict[str, Any]] = {}
    # the validation accuracy ("pgd10" or "clean", SELECTIONS) by which the loop keeps the best checkpoint
    selection: ClassVar[str] = "pgd10"
    # its search space, a YAML file relative to its module's file (a plugin's; the built-ins': search_spaces/)
    search_space: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.selection not in SELECTIONS:
            raise TypeError(f"{cls.__name__}.selection is {cls.selection!r}; choose from {SELECTIONS}")
        bad = [k for k in cls.presets if not isinstance(k, str) or not all(k.split("/")) or k.count("/") > 1]
        if bad:
            raise TypeError(f"{cls.__name__}.presets has key(s) {bad}; a key is a dataset name ('cifar10') or "
                            "'DATASET/ARCH' with the student's architecture ('cifar10/wrn34_10')")
        cls.choices = {**{k: v for k, v in SHARED_CHOICES.items() if k in cls.hparams}, **cls.choices}

    def __init__(self, cfg):
        self.cfg = cfg

    # ---- declarations
    @classmethod
    def check_value(cls, name: str, value) -> None:
        """Raise UsageError unless ``value`` of the hyperparameter ``name`` lies in ``cls.ranges[name]``.

        ``value`` is a number or a :class:`~raydistill.schedules.Schedule`, whose every value (it
        runs between its two endpoints) must lie in the range. Names without a range (strings,
        booleans) and values of other types pass: their type is the configuration's check. The
        message is one line, ``--set NAME=VALUE: NAME of METHOD must be RANGE``, e.g.
        ``--set tau=-1: tau of peeraid must be > 0``, and for a schedule
        ``--set alpha=linear(-1,5,0,10): alpha of rslad must be in [0, 1] at every epoch (it takes -1)``.
        """
        rng = cls.ranges.get(name)
        if rng is None or isinstance(value, bool):
            return
        if isinstance(value, Schedule):
            bad = [v for v in (value.a, value.b) if not rng.contains(v)]
            if bad:
                raise UsageError(f"--set {name}={value}: {name} of {cls.name} must be {rng} at every epoch "
                                 f"(it takes {bad[0]:g})")
        elif isinstance(value, (int, float)) and not rng.contains(value):
            raise UsageError(f"--set {name}={value:g}: {name} of {cls.name} must be {rng}")

    @classmethod
    def validate_config(cls, cfg) -> None:
        """Raise UsageError for settings this method cannot run with (before anything starts)."""

    def networks(self) -> list[NetSpec]:
        return [NetSpec("student", self.cfg.student)]

    # ---- the step
    def inner_max(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {}

    def outer_min(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, adv: dict[str, torch.Tensor],
                  ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        return self.outer_min(nets, x, y, self.inner_max(nets, x, y, ctx), ctx)

    def diagnostics(self, nets: Nets, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {}

    # ---- helpers for subclasses
    def pgd(self, objective, x: torch.Tensor, ctx: StepContext, start: str = "uniform") -> torch.Tensor:
        """The project's one PGD with this run's threat model (eps, step size, steps)."""
        return attacks.pgd(objective, x, eps=ctx.eps, step_size=ctx.step_size, steps=ctx.attack_steps,
                           random_start=start)

    @staticmethod
    @contextmanager
    def attacking(nets: Nets, names: list[str], bn: str) -> Iterator[list[nn.Module]]:
        """The bare modules ``names`` for an attack: the trained networks in BatchNorm mode ``bn``
        ('eval' | 'train'; their fast-path attack views, see raydistill.fastpath), frozen networks
        (teachers) as they always are, in eval(). Modes are restored on exit."""
        trained = [n for n in names if nets.specs[n].trainable]
        with fastpath.attack_views([nets._module(n) for n in trained], bn) as views:
            view = dict(zip(trained, views))
            yield [view[n] if n in view else nets._module(n) for n in names]
