"""Robustness evaluation: the attack table and ``evaluate`` (validation, final test and the evaluate command).

Protocol of the adversarial-distillation papers (L-inf, model in eval mode, inputs in [0, 1]):

=========  ===============================================================
clean      natural accuracy
fgsm       one step of size eps on the cross-entropy, no random start
pgd10      PGD-10 on the cross-entropy, step ``step_size``, uniform start (validation)
pgd20      PGD-20 on the cross-entropy, step ``step_size``, uniform start
cw         CW-inf: PGD-30 on the CW margin loss with kappa 50, uniform start
cw2        CW_2 (L2, unbounded: ignores eps), AdaAD's settings: c 0.1, kappa 0.01, 1000 Adam steps, lr 0.01
aa         AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square)
=========  ===============================================================

``step_size`` defaults to eps / 4 (2/255 for eps 8/255).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from . import attacks as A
from . import fastpath
from .data import to_float
from .errors import UsageError
from .registry import Registry

Progress = Callable[[str, int, int, float], None]  # (attack, batches done, batches total, seconds elapsed)


@dataclass(frozen=True)
class Attack:
    """An evaluation attack: ``run(model, x, y, eps=, step_size=, generator=, seed=) -> x_adv``."""

    name: str
    description: str
    run: Callable[..., torch.Tensor]


ATTACKS: Registry[Attack] = Registry("attack")


def _add(name: str, description: str, run: Callable[..., torch.Tensor]) -> None:
    ATTACKS.add(name, Attack(name, description, run))


_add("clean", "natural accuracy", lambda model, x, y, **kw: x)
_add("fgsm", "FGSM, one step of size eps",
     lambda model, x, y, *, eps, **kw: A.fgsm(model, x, y, eps=eps))
for _steps in (10, 20):
    _add(f"pgd{_steps}", f"PGD-{_steps} on the cross-entropy, uniform start",
         lambda model, x, y, *, eps, step_size, generator, _steps=_steps, **kw:
         A.pgd_attack(model, x, y, eps=eps, step_size=step_size, steps=_steps, generator=generator))
_add("cw", "CW-inf, 30 steps, kappa 50",
     lambda model, x, y, *, eps, step_size, generator, **kw:
     A.cw_linf(model, x, y, eps=eps, step_size=step_size, steps=30, kappa=50.0, generator=generator))
_add("cw2", "CW_2 (L2 Carlini-Wagner as AdaAD: c 0.1, kappa 0.01, 1000 Adam steps of lr 0.01, no eps bound)",
     lambda model, x, y, **kw: A.cw_l2(model, x, y, c=0.1, kappa=0.01, steps=1000, lr=0.01))
_add("aa", "AutoAttack (standard)",
     lambda model, x, y, *, eps, seed, **kw: A.autoattack(model, x, y, eps=eps, seed=seed, batch_size=len(x)))

DEFAULT_ATTACKS = ["clean", "fgsm", "pgd20", "cw"]


def parse_attacks(text: str | Iterable[str]) -> list[str]:
    """``"clean,fgsm,pgd20"`` (or a list) -> validated attack names, duplicates dropped, order kept."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UsageError(f"no attack given; choose from: {', '.join(ATTACKS.names())}")
    for name in names:
        ATTACKS.get(name)
    return list(dict.fromkeys(names))


class StderrProgress:
    """Progress display: one stderr line every ``every`` batches and when an attack finishes."""

    def __init__(self, every: int = 10, stream=None):
        self.every, self.stream = every, stream

    def __call__(self, attack: str, done: int, total: int, elapsed: float) -> None:
        if done == total or done % self.every == 0:
            print(f"[evaluate] {attack}: {done}/{total} batches, {elapsed:.1f}s",
                  file=self.stream or sys.stderr, flush=True)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def evaluate(model: nn.Module, x, y, attacks: list[str], *, eps: float, step_size: float | None = None,
             batch_size: int = 256, device: str | torch.device | None = None,
             progress: Progress | bool | None = None, aa_n_examples: int | None = None,
             seed: int = 0) -> dict[str, float]:
    """Accuracy of ``model`` on (x, y) under each attack: ``{"<attack>_acc": fraction in [0, 1], ...}``.

    x holds images in [0, 1] (float) or 0..255 (uint8), shape (N, C, H, W); y the labels. Batches are
    moved to ``device`` (default: the model's). The model runs in eval mode and gets its previous
    mode back. AutoAttack runs on the first ``aa_n_examples`` examples only (default: all). Random
    starts are drawn from a generator seeded with ``seed`` for each attack, so results are
    reproducible. ``progress``: a callback ``(attack, done, total, seconds)``, True for a stderr
    display, or None/False for silence. Runs in strict fp32 (TF32 off, restored after:
    :func:`raydistill.fastpath.strict_fp32`); the counts stay on the device until an attack is done.
    """
    names = parse_attacks(attacks)
    if eps < 0:
        raise UsageError(f"eps must be >= 0, got {eps}")
    step_size = eps / 4 if step_size is None else step_size
    if step_size < 0:
        raise UsageError(f"step size must be >= 0, got {step_size}")
    if batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch_size}")
    x, y = torch.as_tensor(x), torch.as_tensor(y).long()
    if len(x) != len(y) or len(x) == 0:
        raise UsageError(f"need the same, non-zero number of images and labels (got {len(x)} and {len(y)})")
    device = torch.device(device) if device is not None else _device_of(model)
    report = StderrProgress() if progress is True else (progress or None)

    results: dict[str, float] = {}
    with A.bn_mode(model, "eval"), fastpath.strict_fp32():
        for name in names:
            attack = ATTACKS.get(name)
            n = min(aa_n_examples, len(x)) if name == "aa" and aa_n_examples else len(x)
            generator = torch.Generator(device=device).manual_seed(seed)
            total, correct, start = math.ceil(n / batch_size), 0, time.perf_counter()
            for i, lo in enumerate(range(0, n, batch_size)):
                xb = to_float(x[lo:min(lo + batch_size, n)].to(device))
                yb = y[lo:min(lo + batch_size, n)].to(device)
                x_adv = attack.run(model, xb, yb, eps=eps, step_size=step_size, generator=generator, seed=seed + i)
                with torch.no_grad():
                    correct = correct + (model(x_adv).argmax(dim=1) == yb).sum()  # a device tensor: no wait
                if report:
                    report(name, i + 1, total, time.perf_counter() - start)
            results[f"{name}_acc"] = int(correct) / n
    return results
