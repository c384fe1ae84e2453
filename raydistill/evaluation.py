"""Robustness evaluation: the attack table, the per-image core and ``evaluate``.

Protocol of the adversarial-distillation papers (L-inf, model in eval mode, inputs in [0, 1]):

=============  ===============================================================
clean          natural accuracy
fgsm           one step of size eps on the cross-entropy, no random start
pgd10/50/100   PGD-10/50/100 on the cross-entropy, step ``step_size``, uniform start
pgd20          PGD-20 on the cross-entropy, step ``step_size``, uniform start
cw             CW-inf: PGD-30 on the CW margin loss with kappa 50, uniform start
cw2            CW_2 (L2, unbounded: ignores eps; outside the L-inf threat model, so not in the worst
               case), AdaAD's settings: c 0.1, kappa 0.01, 1000 Adam steps, lr 0.01
aa             AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square); per image, the
               component that fooled it first (``aa_stage``)
pgd100_eps1    PGD-100 at eps 1.0 (the whole [0, 1] box), step 0.025: a gradient-masking check,
               outside the threat model (not in the worst case)
=============  ===============================================================

``step_size`` defaults to eps / 4 (2/255 for eps 8/255).

The unit of work is a *chunk*: images ``[c * batch_size, (c + 1) * batch_size)`` of the evaluated
set. Every attack's randomness on chunk ``c`` is seeded with ``seed + c`` alone, so a chunk's
per-image results are the same whichever process attacks it, in whatever order: one process, the
ranks of a training run, or the Ray workers of a sharded evaluation (raydistill.evalrun).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import attacks as A
from . import choices, fastpath
from .choices import parse_attacks
from .data import to_float
from .errors import UsageError
from .registry import Registry

Progress = Callable[[str, int, int, float], None]  # (attack, batches done, batches total, seconds elapsed)
Columns = dict[str, torch.Tensor]  # per-image results of one attack on one chunk, e.g. {"correct": bool[N]}
AA_STAGES = A.AA_STAGES  # aa_stage codes: index here; -1 = never fooled


@dataclass(frozen=True)
class Attack:
    """An evaluation attack. ``run(model, x, y, eps=, step_size=, generator=, seed=)`` returns the
    adversarial images, or per-image columns (``{"correct": ..., ...}``) when the attack reports more.
    ``threat``: inside the threat model (counted in the per-image worst case); ``hidden``: a check
    that ``--sanity`` runs, not offered to ``--attacks``."""

    name: str
    description: str
    run: Callable[..., torch.Tensor | Columns]
    threat: bool = True
    hidden: bool = False


ATTACKS: Registry[Attack] = Registry("attack")


def _add(name: str, description: str, run: Callable, **kw) -> None:
    ATTACKS.add(name, Attack(name, description, run, **kw))


def _pgd(steps: int, eps: float | None = None, step: float | None = None) -> Callable:
    def run(model, x, y, *, step_size, generator, **kw):
        return A.pgd_attack(model, x, y, eps=kw["eps"] if eps is None else eps,
                            step_size=step_size if step is None else step, steps=steps, generator=generator)
    return run


def _aa(model, x, y, *, eps, seed, **kw) -> Columns:
    x_adv, stage = A.autoattack_stages(model, x, y, eps=eps, seed=seed)
    return {"correct": stage < 0, "aa_stage": stage}


def _zero_grad(model, x, y, **kw) -> Columns:
    """Whether the cross-entropy's gradient with respect to the input is exactly zero (AutoAttack's check)."""
    with A.bn_mode(model, "eval"):
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x).float(), y, reduction="sum"), x)
    return {"zero_grad": grad.flatten(1).abs().sum(1) == 0}


_add("clean", "natural accuracy", lambda model, x, y, **kw: x)
_add("fgsm", "FGSM, one step of size eps", lambda model, x, y, *, eps, **kw: A.fgsm(model, x, y, eps=eps))
for _steps in (10, 20, 50, 100):
    _add(f"pgd{_steps}", f"PGD-{_steps} on the cross-entropy, uniform start", _pgd(_steps))
_add("cw", "CW-inf, 30 steps, kappa 50",
     lambda model, x, y, *, eps, step_size, generator, **kw:
     A.cw_linf(model, x, y, eps=eps, step_size=step_size, steps=30, kappa=50.0, generator=generator))
_add("cw2", "CW_2 (L2 Carlini-Wagner as AdaAD: c 0.1, kappa 0.01, 1000 Adam steps of lr 0.01, no eps bound)",
     lambda model, x, y, **kw: A.cw_l2(model, x, y, c=0.1, kappa=0.01, steps=1000, lr=0.01), threat=False)
_add("aa", "AutoAttack (standard)", _aa)
_add("pgd100_eps1", "PGD-100 at eps 1.0, step 0.025 (gradient-masking check)", _pgd(100, 1.0, 0.025),
     threat=False, hidden=True)
_add("zero_grad", "images whose input gradient is zero (gradient-masking check)", _zero_grad,
     threat=False, hidden=True)

DEFAULT_ATTACKS = list(choices.DEFAULT_EVAL_ATTACKS)
if ATTACKS.names() != [*choices.ATTACKS, *choices.CHECKS]:  # one implementation per name of the list
    raise ImportError(f"raydistill.evaluation implements {ATTACKS.names()}, but raydistill.choices lists "
                      f"{[*choices.ATTACKS, *choices.CHECKS]}")


def offered() -> list[str]:
    """The attacks ``--attacks`` accepts."""
    return list(choices.ATTACKS)


def chunks_of(n: int, batch_size: int) -> list[tuple[int, int]]:
    """The (start, stop) image range of every chunk of an n-image evaluation."""
    return [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]


def attack_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, *, eps: float, step_size: float,
                 seed: int) -> Columns:
    """Per-image results of attack ``name`` on one chunk (already on the model's device, images as floats):
    ``{"correct": bool[N]}`` plus what the attack adds. ``seed``: the chunk's seed (``seed + chunk``)."""
    attack = ATTACKS.get(name)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    with A.bn_mode(model, "eval"), fastpath.strict_fp32():
        out = attack.run(model, x, y, eps=eps, step_size=step_size, generator=generator, seed=seed)
        if isinstance(out, torch.Tensor):
            with torch.no_grad():
                out = {"correct": model(out).argmax(dim=1) == y}
    return out


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


def check_settings(eps: float, step_size: float, batch_size: int) -> None:
    if eps < 0:
        raise UsageError(f"eps must be >= 0, got {eps}")
    if step_size < 0:
        raise UsageError(f"step size must be >= 0, got {step_size}")
    if batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch_size}")


def per_image(model: nn.Module, x, y, attacks: list[str], *, eps: float, step_size: float | None = None,
              batch_size: int = 256, chunks: Iterable[int] | None = None, device: str | torch.device | None = None,
              progress: Progress | bool | None = None, seed: int = 0) -> dict[str, Columns]:
    """Per-image results of each attack on the given chunks of (x, y) (default: all), concatenated in
    chunk order: ``{attack: {"correct": bool[M], ...}}``, tensors on ``device`` (default: the model's)."""
    names = parse_attacks(attacks, hidden=True)
    step_size = eps / 4 if step_size is None else step_size
    check_settings(eps, step_size, batch_size)
    x, y = torch.as_tensor(x), torch.as_tensor(y).long()
    if len(x) != len(y) or len(x) == 0:
        raise UsageError(f"need the same, non-zero number of images and labels (got {len(x)} and {len(y)})")
    device = torch.device(device) if device is not None else _device_of(model)
    report = StderrProgress() if progress is True else (progress or None)
    ranges = chunks_of(len(x), batch_size)
    ids = list(range(len(ranges))) if chunks is None else list(chunks)
    out: dict[str, Columns] = {}
    for name in names:
        parts: list[Columns] = []
        start = time.perf_counter()
        for i, c in enumerate(ids):
            lo, hi = ranges[c]
            xb, yb = to_float(x[lo:hi].to(device)), y[lo:hi].to(device)
            parts.append(attack_chunk(model, xb, yb, name, eps=eps, step_size=step_size, seed=seed + c))
            if report:
                report(name, i + 1, len(ids), time.perf_counter() - start)
        keys = parts[0].keys() if parts else ("correct",)
        out[name] = {k: torch.cat([p[k] for p in parts]) if parts else torch.zeros(0, dtype=torch.bool, device=device)
                     for k in keys}
    return out


def rank_counts(model: nn.Module, x, y, attacks: list[str], *, rank: int, world_size: int, batch_size: int,
                eps: float, step_size: float, device, worst: bool = False) -> tuple[list[str], list[float]]:
    """One rank's share of an evaluation split over ranks: chunk c goes to rank c mod world_size. Returns the
    keys (``<attack>_acc``, and ``worst_acc`` when ``worst`` and at least two threat-model attacks run) and
    this rank's counts of correct images per key, then its image count: summed over ranks and divided by the
    last, they are the accuracies, the same for any world size."""
    threat = [a for a in attacks if ATTACKS.get(a).threat]
    worst = worst and len(threat) > 1
    keys = [f"{a}_acc" for a in attacks] + (["worst_acc"] if worst else [])
    mine = list(range(rank, len(chunks_of(len(y), batch_size)), world_size))
    if not mine:
        return keys, [0.0] * (len(keys) + 1)
    cols = per_image(model, x, y, attacks, eps=eps, step_size=step_size, batch_size=batch_size, chunks=mine,
                     device=device)
    correct = [cols[a]["correct"] for a in attacks]
    if worst:
        correct.append(torch.stack([cols[a]["correct"] for a in threat]).all(dim=0))
    return keys, [float(c.sum()) for c in correct] + [float(len(correct[0]))]


def evaluate(model: nn.Module, x, y, attacks: list[str], *, eps: float, step_size: float | None = None,
             batch_size: int = 256, device: str | torch.device | None = None,
             progress: Progress | bool | None = None, aa_n_examples: int | None = None,
             seed: int = 0) -> dict[str, float]:
    """Accuracy of ``model`` on (x, y) under each attack: ``{"<attack>_acc": fraction in [0, 1], ...}``.

    x holds images in [0, 1] (float) or 0..255 (uint8), shape (N, C, H, W); y the labels. Batches are
    moved to ``device`` (default: the model's). The model runs in eval mode and gets its previous
    mode back. AutoAttack runs on the first ``aa_n_examples`` examples only (default: all). Chunk
    ``c`` (``batch_size`` images) draws its random starts from a generator seeded with ``seed + c``,
    so results are reproducible and do not depend on which process evaluates which chunk.
    ``progress``: a callback ``(attack, done, total, seconds)``, True for a stderr display, or
    None/False for silence. Runs in strict fp32 (TF32 off, restored after:
    :func:`raydistill.fastpath.strict_fp32`); the counts stay on the device until an attack is done.
    """
    names = parse_attacks(attacks, hidden=True)
    results: dict[str, float] = {}
    for name in names:
        n = min(aa_n_examples, len(x)) if name == "aa" and aa_n_examples else len(x)
        cols = per_image(model, x[:n], y[:n], [name], eps=eps, step_size=step_size, batch_size=batch_size,
                         device=device, progress=progress, seed=seed)[name]
        results[f"{name}_acc"] = int(cols["correct"].sum()) / n if "correct" in cols else float("nan")
    return results
