"""Races: steps alternating in rounds, the median speed-up of each over the first.

``compare_authors_peeraid`` races the authors'-code PeerAiD step, which is reference code of the
checkout (``benchmarks/reference/peeraid_authors.py``), not of the installed package, against ours;
``ablation`` races one method's step with each speed feature alone, then together.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .. import fastpath
from ..errors import UsageError
from ..steprunner import StepRunner
from .configs import Bench
from .measure import Timing, run_steps
from .throughput import count_passes

# The features of our step in the authors' comparison: STRICT keeps fp32 arithmetic exactly (up to
# rounding); FAST adds channels_last, which pays off with bf16 (oneDNN's bf16 kernels want NHWC).
STRICT = dict(fold_bn=True, input_grads_only=True)
FAST = dict(STRICT, channels_last=True)

# The checkout's reference code (absent from an installed wheel).
REFERENCE = Path(__file__).resolve().parents[2] / "benchmarks" / "reference" / "peeraid_authors.py"


def authors_peeraid_step() -> Callable[[StepRunner, Tensor, Tensor, Any], None]:
    """``authors_peeraid_step(runner, x, y, ctx)`` of the checkout's reference code; UsageError without it."""
    if not REFERENCE.is_file():
        raise UsageError(f"--compare-authors-peeraid needs the authors' reference step {REFERENCE}, which is "
                         f"part of a raydistill checkout, not of the installed package: run it from a checkout")
    spec = importlib.util.spec_from_file_location("_raydistill_reference_peeraid_authors", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.authors_peeraid_step


@dataclass
class Variant:
    """One contestant of a race: a runner, the step it runs (default: its production step), its own batches."""

    name: str
    runner: StepRunner
    step: Callable[[Tensor, Tensor], Any] | None = None

    def __post_init__(self):
        self.step = self.step or self.runner.step
        self.data = self.runner.batches()


def race(variants: list[Variant], steps: int, rounds: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Alternate the variants, ``steps`` steps each per round (the order rotates every round);
    per variant the median images/s and the median over rounds of its speed-up over ``variants[0]``."""
    def go(v: Variant, n: int) -> Timing:
        torch.set_num_threads(v.runner.threads)
        return run_steps(v.step, v.data, n, v.runner.device)

    for v in variants:
        go(v, warmup)
    ips: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            ips[v.name].append(go(v, steps).images_per_s)
    base = ips[variants[0].name]
    return {v.name: {"images_per_s": statistics.median(ips[v.name]),
                     "speedup": statistics.median(s / b for s, b in zip(ips[v.name], base)),
                     "images_per_s_rounds": ips[v.name]} for v in variants}


def compare_authors_peeraid(bench: Bench) -> dict[str, Any]:
    """The issue's targets: our PeerAiD step in strict fp32 (STRICT features) and on the fast path
    (bf16, FAST features, ``--compile``) against the authors' step (fp32, no features)."""
    a, reference = bench.args, authors_peeraid_step()
    off = dataclasses.asdict(fastpath.FastPath())
    strict, fast = {**off, **STRICT}, {**off, **FAST, "compile": a.compile}
    authors = bench.runner(bench.config("peeraid", precision="fp32", **off))
    ours = bench.runner(bench.config("peeraid", precision="fp32", **strict))
    quick = bench.runner(bench.config("peeraid", precision="bf16", **fast))
    ctx = authors.context(0)
    variants = [Variant("authors_fp32", authors, lambda x, y: reference(authors, x, y, ctx)),
                Variant("ours_fp32", ours), Variant("ours_fast", quick)]
    out = race(variants, a.steps, a.rounds, a.warmup)
    out["authors_fp32"]["passes"] = count_passes(authors, variants[0].step)
    out["ours_fp32"]["passes"] = count_passes(ours)
    out["ours_fp32"]["features"], out["ours_fast"]["features"] = strict, dict(fast, precision="bf16")
    return out


def ablation(bench: Bench, method: str) -> dict[str, Any]:
    """The step of ``method`` with each speed feature alone, then together (fp32 and bf16)."""
    a = bench.args
    off = dataclasses.asdict(fastpath.FastPath())
    settings = {"fp32": {}, **{f"fp32+{k}": {k: True} for k in FAST}, "fp32+strict": STRICT,
                "bf16": {"precision": "bf16"}, "bf16+channels_last": {"precision": "bf16", "channels_last": True},
                "bf16+fast": dict(FAST, precision="bf16")}
    if a.compile != "none":
        settings[f"bf16+fast+compile_{a.compile}"] = dict(FAST, precision="bf16", compile=a.compile)
    if (a.threads or 0) != 1 and os.cpu_count() > 1:
        settings["fp32+threads=1"] = {"threads": 1}
    return race([Variant(name, bench.runner(bench.config(method, **{**off, "precision": "fp32", **changes})))
                 for name, changes in settings.items()], a.steps, a.rounds, a.warmup)
