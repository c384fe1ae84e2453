"""The checks a plugin passes before anything starts (built-ins are trusted): one ``error:`` line each.

* :func:`check_plugin`, as the plugin loads: each method it adds has a lower-case name, an ``outer_min``, a
  range for every numeric hyperparameter (and choices for every text one), defaults inside them, ``ranges``,
  ``choices``, ``presets`` and ``settings`` that name only its own hyperparameters and known settings, and a
  declared search space that loads (it names only the method's hyperparameters); each model a factory with
  valid ``input_sizes``; each dataset a loader with a class count >= 2 and a (C, H, W) shape.
* :func:`check_config`, for a run's configuration on the driver (train, tune, study, bench): each plugin
  model it uses is built for the dataset's shape and classes and run forward on a batch of 2 (logits of
  shape (2, classes), finite); a plugin method runs one training step (attack included, at most 2 attack
  steps) with the configured networks on 2 random images of the dataset's shape: every loss term must be a
  finite scalar that gradients flow through, every diagnostic a finite per-image tensor. In-process, on the
  CPU, seconds at most.
"""
from __future__ import annotations

import inspect
import math
import re
import sys
import traceback
from pathlib import Path
from .errors import UsageError

NAME = re.compile(r"[a-z][a-z0-9_]*")
_checked: set = set()


def check_plugin(plugin) -> None:
    """The static checks of everything ``plugin`` registered (raises UsageError naming it)."""
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    for name in METHODS.added_by(plugin):
        _method(plugin, name, METHODS._items[name])
    for name in MODELS.added_by(plugin):
        _name(plugin, "model", name)
        if not callable(MODELS._items[name]):
            raise UsageError(f"plugin {plugin.label}: model '{name}' is not a factory (num_classes, in_channels) -> nn.Module")
    for name in DATASETS.added_by(plugin):
        _dataset(plugin, name, DATASETS._items[name])


def _name(plugin, kind: str, name: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UsageError(f"plugin {plugin.label}: {kind} name {name!r} must be lower case: a letter, then letters, "
                         "digits or _")


def _method(plugin, name: str, cls) -> None:
    from .config import EXPERIMENT_FIELDS
    from .methods.base import Method
    from .schedules import Schedule

    _name(plugin, "method", name)
    bad = lambda why: UsageError(f"plugin {plugin.label}: method '{name}' {why}")  # noqa: E731
    if cls.outer_min is Method.outer_min:
        raise bad("has no outer_min: define outer_min(self, nets, x, y, adv, ctx) returning its named loss terms")
    for table in ("ranges", "choices"):
        extra = sorted(set(getattr(cls, table)) - set(cls.hparams))
        if extra:
            raise bad(f"declares {table} for '{extra[0]}', which is not one of its hparams "
                      f"({', '.join(sorted(cls.hparams)) or 'none'})")
    for hp, default in cls.hparams.items():
        numeric = isinstance(default, (int, float, Schedule)) and not isinstance(default, bool)
        if numeric and hp not in cls.ranges:
            raise bad(f"has no range for its numeric hyperparameter '{hp}' (default {default}): declare it in ranges, "
                      "e.g. ranges = {'" + hp + "': WEIGHT} (raydistill.extend: Range, WEIGHT, POSITIVE, FRACTION, ...)")
        if isinstance(default, str) and hp not in cls.choices:
            raise bad(f"has no choices for its text hyperparameter '{hp}': declare them in choices, "
                      "e.g. choices = {'" + hp + "': ('a', 'b')}")
        if numeric and not isinstance(default, Schedule) and not (math.isfinite(default) and cls.ranges[hp].contains(default)):
            raise bad(f"has default {hp}={default}, outside its range ({cls.ranges[hp]})")
        if isinstance(default, str) and default not in cls.choices[hp]:
            raise bad(f"has default {hp}={default!r}, not one of its choices ({', '.join(map(str, cls.choices[hp]))})")
        if not isinstance(default, (bool, int, float, str, Schedule)):
            raise bad(f"has hyperparameter '{hp}' of type {type(default).__name__}: use a number, true/false or text")
    for where, layer in [("settings", cls.settings)] + [(f"presets[{d!r}]", p) for d, p in cls.presets.items()]:
        if not isinstance(layer, dict):
            raise bad(f"{where} is not a mapping")
        unknown = sorted(k for k in layer if k != "hp" and k not in EXPERIMENT_FIELDS)
        if unknown:
            raise bad(f"{where} sets '{unknown[0]}', which is not a training setting (the option table: epochs, lr, eps, ...)")
        unknown = sorted(set(layer.get("hp", {})) - set(cls.hparams))
        if unknown:
            raise bad(f"{where} sets hyperparameter '{unknown[0]}', which it does not have")
    if cls.search_space and not plugin.shipped:  # the driver's check (a worker's copy is the .py file alone)
        from . import search_space

        path = search_space.declared_path(cls)
        if not path.is_file():
            raise bad(f"declares search_space '{cls.search_space}', but {path} does not exist")
        try:
            search_space.load(name, path)
        except UsageError as exc:
            raise UsageError(f"plugin {plugin.label}: method '{name}': {exc}") from None


def _dataset(plugin, name: str, spec) -> None:
    from .config import EXPERIMENT_FIELDS

    _name(plugin, "dataset", name)
    bad = lambda why: UsageError(f"plugin {plugin.label}: dataset '{name}' {why}")  # noqa: E731
    if spec.num_classes is not None and (isinstance(spec.num_classes, bool) or not isinstance(spec.num_classes, int)
                                         or spec.num_classes < 2):
        raise bad(f"has num_classes {spec.num_classes!r}: give an integer >= 2")
    shape = spec.in_shape
    if shape is not None and not (isinstance(shape, (tuple, list)) and len(shape) == 3
                                  and all(isinstance(s, int) and s >= 1 for s in shape)):
        raise bad(f"has in_shape {shape!r}: give (channels, height, width), e.g. (3, 32, 32)")
    params = inspect.signature(spec.loader).parameters
    if not all(p in params for p in ("data_dir", "download")) and not any(
            p.kind == p.VAR_KEYWORD for p in params.values()):
        raise bad("has a loader without the parameters data_dir and download: loader(data_dir, download, **options)")
    unknown = sorted(k for k in spec.defaults if k != "hp" and k not in EXPERIMENT_FIELDS)
    if unknown:
        raise bad(f"has default '{unknown[0]}', which is not a training setting (the option table: eps, epochs, ...)")


# ----------------------------------------------------------------------------- a run's configuration
def check_config(cfg) -> None:
    """The checks of the plugin model(s) and method a configuration uses, on 2 images (once per process)."""
    from .origins import plugin_of

    if _in_ray_worker():  # a search's trial, a study's run: their driver checked the configuration
        return
    method = plugin_of("method", cfg.method)
    models = [(a, plugin_of("model", a)) for a in dict.fromkeys(x for x in (cfg.student, cfg.peer) if x)]
    models = [(a, p) for a, p in models if p is not None]
    if method is None and not models:
        return
    shape, classes = _shape(cfg)
    key = (cfg.method, cfg.student, cfg.peer, cfg.dataset, shape, classes, cfg.teacher, cfg.natural_teacher,
           tuple(sorted((k, str(v)) for k, v in cfg.hp.items())))
    if key in _checked:
        return
    for arch, plugin in models:
        _forward(plugin, arch, cfg.dataset, shape, classes)
    if method is not None:
        _step(method, cfg, shape, classes)
    _checked.add(key)


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    from ray._private import worker

    return worker.global_worker.mode == worker.WORKER_MODE


def _shape(cfg) -> tuple[tuple[int, int, int], int]:
    from .data import DATASETS

    spec = DATASETS.get(cfg.dataset)
    shape = spec.in_shape or tuple(cfg.dataset_options.get("shape", (3, 32, 32)))
    return tuple(int(s) for s in shape), int(spec.num_classes or cfg.dataset_options.get("num_classes", 10))


def _forward(plugin, arch: str, dataset: str, shape, classes: int) -> None:
    import torch

    from .models import build_model

    what = f"plugin {plugin.label}: model '{arch}' fails on {dataset}'s inputs {tuple(shape)} with {classes} classes"
    try:
        model = build_model(arch, classes, shape).eval()
        with torch.no_grad():
            out = model(torch.rand(2, *shape))
    except UsageError as exc:
        raise UsageError(f"{what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the plugin's own error, in one line
        raise UsageError(f"{what}: {_line(exc, plugin)}") from None
    if not torch.is_tensor(out) or tuple(out.shape) != (2, classes):
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise UsageError(f"{what}: a batch of 2 gives {got}, not logits of shape (2, {classes})")
    if not torch.isfinite(out).all():
        raise UsageError(f"{what}: its logits on a batch of 2 are not finite")


def _step(plugin, cfg, shape, classes: int) -> None:
    """One training step of the plugin method on 2 random images, with the configured networks."""
    import torch

    from .checkpoint import load_model
    from .methods import HP, Nets, StepContext, get_method
    from .models import build_model

    name = cfg.method
    what = f"plugin {plugin.label}: method '{name}'"
    torch.manual_seed(0)
    try:
        method = get_method(name)(cfg)
        specs = method.networks()
        modules = {}
        for spec in specs:
            if spec.trainable:
                modules[spec.name] = build_model(spec.arch, classes, shape).train()
            elif spec.checkpoint and not str(spec.checkpoint).startswith("study://"):
                m, _ = load_model(spec.checkpoint, "cpu", arch=spec.arch or None, num_classes=classes, in_shape=shape,
                                  what=spec.flag or spec.name)
                modules[spec.name] = m.requires_grad_(False).eval()
            else:  # a teacher that a study trains first: the step is checked when the study starts it
                return
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{what} fails to set up its networks: {_line(exc, plugin)}") from None
    nets = Nets(modules, modules, specs)
    ctx = StepContext(eps=cfg.eps, step_size=cfg.step_size, attack_steps=min(2, cfg.attack_steps), hp=HP(cfg.hp, 0.0))
    x, y = torch.rand(2, *shape), torch.arange(2) % classes
    batch = f"a batch of 2 {cfg.dataset} images {tuple(shape)}"
    try:
        terms = method.step(nets, x, y, ctx)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{what} fails on {batch}: {_line(exc, plugin)}") from None
    if not isinstance(terms, dict) or not terms:
        raise UsageError(f"{what}: outer_min returned {type(terms).__name__}, not a non-empty dict of named loss terms")
    for term, value in terms.items():
        if not (torch.is_tensor(value) and value.dim() == 0 and value.is_floating_point()):
            got = f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
            raise UsageError(f"{what}: loss term '{term}' is {got} on {batch}, not a scalar: reduce it (mean over the batch)")
        if not torch.isfinite(value.detach()):
            raise UsageError(f"{what}: loss term '{term}' is {value.item()} on {batch}, not a finite number")
    total = sum(terms.values())
    if not total.requires_grad:
        raise UsageError(f"{what}: no gradient flows through its loss terms ({', '.join(terms)}) on {batch}: "
                         "compute them from nets.<name>(x), not under torch.no_grad() or detached")
    try:
        total.backward()
        diagnostics = method.diagnostics(nets, x, y, ctx)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{what} fails on {batch}: {_line(exc, plugin)}") from None
    for key, value in (diagnostics or {}).items():
        if not (torch.is_tensor(value) and value.shape[:1] == (2,) and torch.isfinite(value.float()).all()):
            raise UsageError(f"{what}: diagnostic '{key}' is not a finite per-image tensor (first dimension 2) on {batch}")


def _line(exc: BaseException, plugin) -> str:
    return error_line(exc, plugin.roots)


def error_line(exc: BaseException, roots: list) -> str:
    """``TypeName: message (file.py line N)``: the innermost place inside the plugin's code, else the last one."""
    text = " ".join(str(exc).split()) or "(no message)"
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) and exc.filename:
        frames.append(traceback.FrameSummary(exc.filename, exc.lineno or 0, "<module>"))
        text = exc.msg
    inside = [f for f in frames if any(_under(f.filename, r) for r in roots)]
    where = (inside or frames or [None])[-1]
    at = f" ({Path(where.filename).name} line {where.lineno})" if where is not None else ""
    return f"{type(exc).__name__}: {text}{at}"


def _under(filename: str, root: Path) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(Path(root).resolve())
    except (OSError, ValueError):
        return False

