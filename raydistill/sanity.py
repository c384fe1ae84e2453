"""Gradient-masking checks (``evaluate --sanity``), from the per-image results of a few extra attacks.

A model that masks or obfuscates its gradients (a step function, a saturated softmax, randomness) looks
robust to gradient-based attacks without being robust. The checks, after AutoAttack's authors' flags
(Croce & Hein 2020, pyautoattack's checks) and the PeerAiD paper's appendix:

==========================  ====================================================================
unbounded_pgd               PGD-100 at eps 1.0 (the whole [0, 1] box) leaves more than 1 % accuracy
more_steps_help             accuracy rises from PGD-10 to PGD-50 or from PGD-50 to PGD-100 beyond
                            noise: the images that more steps leave correct but fewer fooled
                            outnumber the reverse by more than max(1, 2 sqrt(b + c)) (b, c: the two
                            discordant counts; the same random start on every image, so the
                            comparison is paired)
black_box_beats_white_box   Square (AutoAttack's black-box component) fools an image that every
                            white-box attack run (AutoAttack's APGD-CE, APGD-T, FAB-T and the other
                            gradient attacks asked for) left correct
zero_gradients              an image's cross-entropy gradient with respect to the input is exactly 0
==========================  ====================================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# what --sanity adds to the attacks asked for
ATTACKS = ("pgd10", "pgd50", "pgd100", "aa", "pgd100_eps1", "zero_grad")
MAX_UNBOUNDED_ACC = 0.01


@dataclass(frozen=True)
class Finding:
    check: str
    failed: bool
    message: str


def _rise(more: np.ndarray, fewer: np.ndarray) -> tuple[int, float]:
    """(images correct under more steps but fooled by fewer, minus the reverse; the noise threshold)."""
    b, c = int((more & ~fewer).sum()), int((~more & fewer).sum())
    return b - c, max(1.0, 2 * math.sqrt(b + c))


def check(table, white_box: list[str]) -> tuple[list[Finding], dict[str, float]]:
    """The findings and their figures, from ``evalrun.combine``'s per-image table (with the columns of
    ``ATTACKS``). ``white_box``: the gradient attacks run, whose columns count against Square."""
    col = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    n = len(col["index"])
    out: list[Finding] = []
    figures: dict[str, float] = {}

    acc = float(col["pgd100_eps1"].astype(bool).mean())
    figures["unbounded_pgd_acc"] = acc
    out.append(Finding("unbounded_pgd", acc > MAX_UNBOUNDED_ACC,
                       f"PGD-100 at eps 1.0 leaves {100 * acc:.2f}% accuracy (an honest model drops to "
                       f"<= {100 * MAX_UNBOUNDED_ACC:.0f}%): gradients are masked or obfuscated"))

    p10, p50, p100 = (col[k].astype(bool) for k in ("pgd10", "pgd50", "pgd100"))
    figures.update({"pgd10_acc": float(p10.mean()), "pgd50_acc": float(p50.mean()), "pgd100_acc": float(p100.mean())})
    rises = [(a, b, *_rise(m, f)) for a, b, m, f in (("PGD-10", "PGD-50", p50, p10), ("PGD-50", "PGD-100", p100, p50))]
    bad = [(a, b, r, t) for a, b, r, t in rises if r > t]
    out.append(Finding("more_steps_help", bool(bad),
                       "accuracy rises with more PGD steps: " + "; ".join(
                           f"{r} more images correct after {b} than after {a} (noise {t:.1f})" for a, b, r, t in bad)
                       + f" (PGD-10 {100 * p10.mean():.2f}%, PGD-50 {100 * p50.mean():.2f}%, PGD-100 {100 * p100.mean():.2f}%)"))

    stage = col["aa_stage"]
    white = np.ones(n, dtype=bool)
    for name in white_box:
        white &= col[name].astype(bool)
    square_only = int(((stage == "square") & white).sum())
    figures["square_only_images"] = float(square_only)
    out.append(Finding("black_box_beats_white_box", square_only > 0,
                       f"Square (black-box) fooled {square_only} of {n} images that every white-box attack "
                       f"({', '.join(['apgd-ce', 'apgd-t', 'fab-t'] + white_box)}) left correct"))

    zero = int(col["zero_grad"].astype(bool).sum())
    figures["zero_grad_images"] = float(zero)
    out.append(Finding("zero_gradients", zero > 0,
                       f"{zero} of {n} images have an all-zero input gradient: gradient attacks cannot move them"))
    return out, figures
