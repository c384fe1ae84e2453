"""A method's ``results`` entry: throughput, passes, evaluation speed and memory of its production step.

Each method is set up exactly as ``train`` sets it up (``StepRunner``: data on the device, networks,
optimizers; offline methods get random-init teachers of the student's architecture) and its step is
the production one (``StepRunner.step``, i.e. ``Trainer.train_step``): the inner maximisation, the
outer minimisation (under bf16 autocast with ``--precision bf16``), one backward, the optimizer
steps. Hyperparameters are the method's defaults, with IAD's introspection warm-up skipped
(``warmup=0``) so that the full step is measured. Per method the entry holds:

* ``images_per_s``: training images per second of the step over ``--steps`` steps after
  ``--warmup`` steps (full batches of ``--batch-size``);
* ``data_share``: the share of the loop's time spent drawing batches (``StepRunner.batches``:
  indexing, on-device augmentation) rather than in the step: the time compute waits for data;
* ``eval_images_per_s``: ``{"clean", "pgd20"}``, images per second of ``evaluation.evaluate`` of the
  student on ``--eval-examples`` test images, with the run's precision and speed features;
* ``passes``: per network, ``{"forward": f, "backward": b}`` in one training step. ``forward``
  counts calls of the network's top module (its BatchNorm-folded copy and compiled wrapper count as
  the network); ``backward`` counts the gradients that arrive at the output of such a call (a hook
  on the output tensor), i.e. one per forward whose graph a backward runs through: the attack's
  input-gradient passes included, and one ``loss.backward()`` through S(x*) and S(x) counts two;
* ``peak_mem_mb``: on a GPU ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps;
  on the CPU the peak resident set size during them minus the RSS after set-up (Linux: VmHWM of
  /proc/self/status, reset through /proc/self/clear_refs): what the steps need beyond weights and
  data (activations, gradients, optimizer state, the allocator's cache). The heap an earlier
  method left behind may be reused by a later one: for CPU memory, one method per invocation.
  ``peak_mem_source`` says which;
* ``flops_per_step``: the floating-point operations of one step (``torch.utils.flop_counter``:
  matrix multiplications and convolutions, forward and backward, the attack's included, counted on
  the uncompiled step), and ``tflops_per_s`` = ``flops_per_step`` / ``step_time_s`` / 1e12: what a
  GPU's peak is compared with (``raydistill.gpucheck`` gives the share of the H200's bf16 peak).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

from torch import Tensor

from .. import fastpath
from ..provenance import used_by
from ..steprunner import StepRunner
from .configs import Bench
from .measure import PassCounter, PeakMemory, run_steps, sync


def count_flops(runner: StepRunner, step: Callable[[Tensor, Tensor], Any], data: Iterator) -> int:
    """Floating-point operations of one step (matmuls and convolutions, forward and backward), by
    torch's own FLOP formulas. A plain dispatch mode: ``FlopCounterMode``'s module tracker refuses the
    attacks' ``autograd.grad``."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += int(formula(*args, **kwargs, out_val=out))
            return out

    with Count() as counter:
        step(*next(data))
    return counter.total


def count_passes(runner: StepRunner, step: Callable[[Tensor, Tensor], Any] | None = None,
                 data: Iterator | None = None) -> dict[str, dict[str, int]]:
    """Forward and backward passes per network in one step (default: the runner's production step
    on its batches). Run a step once before: folded copies are made then."""
    step, data = step or runner.step, data or runner.batches()
    with PassCounter(runner.modules()) as counter:
        step(*next(data))
    return counter.counts


def eval_speed(runner: StepRunner, n: int, batch_size: int) -> dict[str, float]:
    """Images per second of clean and PGD-20 evaluation of the student (after a one-batch warm-up)."""
    from ..evaluation import evaluate

    cfg, d, device = runner.cfg, runner.data, runner.device
    model = runner.eval_model()
    x, y = d.test_x[:n], d.test_y[:n]
    out = {}
    for attack in ("clean", "pgd20"):
        with fastpath.autocast(device, cfg.precision):
            kw = dict(eps=cfg.eps, step_size=cfg.step_size, batch_size=batch_size, device=device)
            evaluate(model, x[:batch_size], y[:batch_size], [attack], **kw)
            sync(device)
            t0 = time.perf_counter()
            evaluate(model, x, y, [attack], **kw)
            sync(device)
        out[attack] = len(y) / (time.perf_counter() - t0)
    return out


def bench_method(bench: Bench, method: str) -> dict[str, Any]:
    """The ``results`` entry of one method."""
    a = bench.args
    cfg = bench.config(method)
    runner = bench.runner(cfg)
    data = runner.batches()
    with PeakMemory(runner.device) as mem:
        run_steps(runner.step, data, a.warmup, runner.device)
        timing = run_steps(runner.step, data, a.steps, runner.device)
    if cfg.compile == "none":
        passes = count_passes(runner, runner.step, data)
        flops = count_flops(runner, runner.step, data)
    else:  # hooks inside compiled code are not reliable: count on an uncompiled twin (the same passes)
        twin = bench.runner(bench.config(method, compile="none"))
        twin_data = twin.batches()
        run_steps(twin.step, twin_data, 1, twin.device)
        passes = count_passes(twin, twin.step, twin_data)
        flops = count_flops(twin, twin.step, twin_data)
    step_s = timing.step_s / a.steps
    return {"method": method, "student": cfg.student, "networks": {n: s.arch or "checkpoint" for n, s in
                                                                   runner.specs.items()},
            "batch_size": cfg.batch_size, "steps": a.steps, "attack_steps": cfg.attack_steps,
            "precision": cfg.precision, "features": dataclasses.asdict(fastpath.FastPath.of(cfg)),
            "images_per_s": timing.images_per_s, "step_time_s": step_s,
            "flops_per_step": flops, "tflops_per_s": flops / step_s / 1e12 if step_s > 0 else None,
            "data_share": timing.data_share, "plugins": used_by(cfg),
            "eval_images_per_s": eval_speed(runner, a.eval_examples, a.eval_batch_size),
            "passes": passes, "peak_mem_mb": mem.mb, "peak_mem_source": mem.source}
