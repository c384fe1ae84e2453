"""``python -m raydistill.bench``: throughput of the production training step, per method.

Each method is set up exactly as ``train`` sets it up (``Trainer.setup``: data on the device,
networks, optimizers; offline methods get random-init teachers of the student's architecture) and
its step is ``Trainer.train_step``: the inner maximisation, the outer minimisation (under bf16
autocast with ``--precision bf16``), one backward, the optimizer steps. Hyperparameters are the
method's defaults, with IAD's introspection warm-up skipped (``warmup=0``) so that the full step is
measured. Per method the JSON's ``results`` entry holds:

* ``images_per_s``: training images per second of ``train_step`` over ``--steps`` steps after
  ``--warmup`` steps (full batches of ``--batch-size``);
* ``data_share``: the share of the loop's time spent drawing batches from ``iterate_batches``
  (indexing, on-device augmentation) rather than in ``train_step``: the time compute waits for data;
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
  ``peak_mem_source`` says which.

Other modes: ``--compare-authors-peeraid`` races the authors'-code PeerAiD step (fp32, three student
forwards, parameters requiring gradients in the attack) against ours in strict fp32 and on the fast
path, in alternating rounds, and prints the median speed-ups; ``--ablation`` races the first
method's step with each speed feature alone; ``--ray-overhead`` compares the steady-state epoch
time of a 1-worker TorchTrainer run with the in-process loop (with ``--beside-idle-ray`` also the
in-process loop beside an idle Ray instance: how much of it is CPU contention with Ray's processes,
and the share of the machine's CPUs those processes took meanwhile); ``--pgd20-check CHECKPOINT``
compares a fixed model's PGD-20 accuracy in fp32 and on the fast path.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fastpath
from .cli import ArgParser, nonneg_int, positive_int
from .config import DATASET_NAMES, TrainConfig, build_config
from .errors import UsageError, cli_entry

# The features of our step in the authors' comparison: STRICT keeps fp32 arithmetic exactly (up to
# rounding); FAST adds channels_last, which pays off with bf16 (oneDNN's bf16 kernels want NHWC).
STRICT = dict(fold_bn=True, input_grads_only=True)
FAST = dict(STRICT, channels_last=True)


# ============================================================================= measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PassCounter:
    """Forward and backward passes of each network (see the module docstring) while in a ``with`` block."""

    def __init__(self, nets):
        self.counts = {n: {"forward": 0, "backward": 0} for n in nets.names()}
        mods = [(n, m) for n in nets.names() for m in [nets.raw(n), *fastpath.views_of(nets.raw(n))]]
        self.handles = [m.register_forward_hook(partial(self._forward, n)) for n, m in mods]

    def _forward(self, name: str, module, args, output) -> None:
        self.counts[name]["forward"] += 1
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(partial(self._backward, name))

    def _backward(self, name: str, grad: Tensor) -> None:
        self.counts[name]["backward"] += 1

    def __enter__(self) -> "PassCounter":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


class PeakMemory:
    """Peak memory in MiB of a ``with`` block: CUDA max_memory_allocated, or the CPU's RSS peak delta."""

    STATUS, CLEAR = "/proc/self/status", "/proc/self/clear_refs"

    def __init__(self, device: torch.device):
        self.device, self.mb, self.source = device, None, "unavailable"

    def _status_kb(self, key: str) -> int:
        with open(self.STATUS) as fh:
            return int(next(ln for ln in fh if ln.startswith(key + ":")).split()[1])

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = "torch.cuda.max_memory_allocated"
        else:
            try:
                with open(self.CLEAR, "w") as fh:
                    fh.write("5")  # resets VmHWM to the current RSS
                self.base_kb = self._status_kb("VmRSS")
                self.source = "cpu peak RSS - RSS before (VmHWM, /proc/self/clear_refs)"
            except OSError:
                self.base_kb = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        elif self.base_kb is not None:
            self.mb = (self._status_kb("VmHWM") - self.base_kb) / 1024


@dataclass
class Timing:
    images: int = 0
    step_s: float = 0.0
    data_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.step_s, 1e-9)

    @property
    def data_share(self) -> float:
        return self.data_s / max(self.data_s + self.step_s, 1e-9)


def run_steps(step: Callable[[Tensor, Tensor], Any], data: Iterator, n: int, device: torch.device) -> Timing:
    """``n`` steps on batches from ``data``, timing the batch draws and the steps apart."""
    t = Timing()
    for _ in range(n):
        t0 = time.perf_counter()
        x, y = next(data)
        sync(device)
        t1 = time.perf_counter()
        step(x, y)
        sync(device)
        t.data_s += t1 - t0
        t.step_s += time.perf_counter() - t1
        t.images += len(y)
    return t


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on (the load average shows whether the machine was busy)."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device),
            "load_avg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), bf16=torch.cuda.is_bf16_supported())
    else:
        info.update(bf16=torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    amx=torch.cpu._is_amx_tile_supported())
    return info


# ============================================================================= set-up
class Bench:
    """Builds the configs and trainers of one bench invocation (teachers and runs in ``workdir``)."""

    def __init__(self, args: argparse.Namespace, workdir: str):
        from .data import load_dataset

        self.args, self.workdir = args, Path(workdir)
        self.options = ({"shape": (3, args.image_size, args.image_size), "num_classes": args.num_classes,
                         "n_train": args.batch_size * max(args.steps, 4) + 2 * args.num_classes,
                         "n_test": args.eval_examples} if args.dataset == "synthetic" else {})
        d = load_dataset(args.dataset, data_dir=args.data_dir, val_size=0, **self.options)
        self.num_classes, self.in_shape = d.num_classes, d.in_shape
        self._teachers: dict[str, str] = {}

    def teacher(self, role: str) -> str:
        """A random-init checkpoint of the student's architecture (offline methods' --teacher)."""
        from .checkpoint import save_model
        from .models import build_model

        if role not in self._teachers:
            model = build_model(self.args.student, self.num_classes, self.in_shape)
            self._teachers[role] = str(save_model(self.workdir / role, model, self.args.student, self.num_classes,
                                                  self.in_shape, {"note": "random init, for benchmarking"}))
        return self._teachers[role]

    def config(self, method: str, **changes) -> TrainConfig:
        """The method's config for this benchmark; ``changes`` override fields (features, precision)."""
        from .methods import get_method
        from .methods._teachers import OfflineMethod

        a, cls = self.args, get_method(method)
        hp = {"warmup": "0"} if "warmup" in cls.hparams else {}
        hp.update({k: v for k, v in a.hp.items() if k in cls.hparams})
        offline = issubclass(cls, OfflineMethod)
        ns = argparse.Namespace(
            preset=None, dataset=a.dataset, data_dir=a.data_dir, student=a.student, peer=a.peer,
            batch_size=a.batch_size, precision=a.precision, attack_steps=a.attack_steps, seed=a.seed, workers=0,
            set=[f"{k}={v}" for k, v in hp.items()],
            teacher=self.teacher("teacher") if offline else None,
            natural_teacher=self.teacher("teacher_nat") if offline and cls.uses_natural_teacher else None)
        cfg = build_config(method, ns)
        cfg.dataset_options, cfg.val_size, cfg.threads = dict(self.options), 0, a.threads
        cfg.storage_path, cfg.name = str(self.workdir / "runs"), f"bench-{method}"
        for f in dataclasses.fields(fastpath.FastPath):
            setattr(cfg, f.name, getattr(a, f.name))
        for k, v in changes.items():
            setattr(cfg, k, v)
        return cfg

    def trainer(self, cfg: TrainConfig):
        from .engine import LocalSession, Trainer

        trainer = Trainer(cfg, LocalSession(str(self.workdir / "runs" / f"{cfg.method}-{id(cfg)}")))
        trainer.setup()
        return trainer


def batches(trainer) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless full training batches as the loop draws them: on the device, augmented, epoch after epoch."""
    from .data import iterate_batches

    d, cfg = trainer.data, trainer.cfg
    for epoch in itertools.count():
        yield from iterate_batches(d.train_x, d.train_y, trainer.per_worker_batch, shuffle=True, seed=cfg.seed,
                                   epoch=epoch, drop_last=True, augment=True, crop_pad=d.crop_pad, hflip=d.hflip,
                                   device=trainer.device)


def production_step(trainer) -> Callable[[Tensor, Tensor], Any]:
    ctx = trainer.step_context(0)
    return lambda x, y: trainer.train_step(x, y, ctx)


def count_passes(trainer, step: Callable[[Tensor, Tensor], Any], data: Iterator) -> dict[str, dict[str, int]]:
    """Forward and backward passes per network in one step (run it once before: folded copies are made then)."""
    with PassCounter(trainer.nets) as counter:
        step(*next(data))
    return counter.counts


def eval_speed(trainer, n: int, batch_size: int) -> dict[str, float]:
    """Images per second of clean and PGD-20 evaluation of the student (after a one-batch warm-up)."""
    from .evaluation import evaluate

    cfg, d = trainer.cfg, trainer.data
    model = fastpath.inference_view(trainer.nets.raw(trainer.selected))
    x, y = d.test_x[:n], d.test_y[:n]
    out = {}
    for attack in ("clean", "pgd20"):
        with fastpath.autocast(trainer.device, cfg.precision):
            kw = dict(eps=cfg.eps, step_size=cfg.step_size, batch_size=batch_size, device=trainer.device)
            evaluate(model, x[:batch_size], y[:batch_size], [attack], **kw)
            sync(trainer.device)
            t0 = time.perf_counter()
            evaluate(model, x, y, [attack], **kw)
            sync(trainer.device)
        out[attack] = len(y) / (time.perf_counter() - t0)
    return out


def bench_method(bench: Bench, method: str) -> dict[str, Any]:
    """The ``results`` entry of one method."""
    a = bench.args
    cfg = bench.config(method)
    trainer = bench.trainer(cfg)
    step, data = production_step(trainer), batches(trainer)
    with PeakMemory(trainer.device) as mem:
        run_steps(step, data, a.warmup, trainer.device)
        timing = run_steps(step, data, a.steps, trainer.device)
    if cfg.compile == "none":
        passes = count_passes(trainer, step, data)
    else:  # hooks inside compiled code are not reliable: count on an uncompiled twin (the same passes)
        twin_cfg = copy.copy(cfg)
        twin_cfg.compile = "none"
        twin = bench.trainer(twin_cfg)
        twin_step, twin_data = production_step(twin), batches(twin)
        run_steps(twin_step, twin_data, 1, twin.device)
        passes = count_passes(twin, twin_step, twin_data)
    return {"method": method, "student": cfg.student, "networks": {n: s.arch or "checkpoint" for n, s in
                                                                   trainer.nets.specs.items()},
            "batch_size": cfg.batch_size, "steps": a.steps, "attack_steps": cfg.attack_steps,
            "precision": cfg.precision, "features": dataclasses.asdict(fastpath.FastPath.of(cfg)),
            "images_per_s": timing.images_per_s, "step_time_s": timing.step_s / a.steps,
            "data_share": timing.data_share,
            "eval_images_per_s": eval_speed(trainer, a.eval_examples, a.eval_batch_size),
            "passes": passes, "peak_mem_mb": mem.mb, "peak_mem_source": mem.source}


# ============================================================================= races
def authors_peeraid_step(trainer, x: Tensor, y: Tensor, ctx) -> None:
    """One PeerAiD step as the authors' code computes it: the baseline of the issue's speed targets.

    fp32; the peer's clean prediction under no_grad in eval(); the attack in eval() on the summed
    KL from an unclamped x + 0.001·N(0, 1), with the student's parameters requiring gradients;
    then, in train(), P(x*), S(x*) for the peer's loss, S(x*) again and S(x) for the student's
    loss; one backward, both SGD steps (the trainer's optimizers). The same equations as
    raydistill.methods.peeraid with its defaults (tests/test_bench.py checks the update matches).
    """
    hp, nets = ctx.hp, trainer.nets
    student, peer = nets.raw("student"), nets.raw("peer")
    peer.eval()
    with torch.no_grad():
        target = F.softmax(peer(x), dim=1)
    student.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, device=x.device)
    for _ in range(ctx.attack_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.kl_div(F.log_softmax(student(x_adv), dim=1), target, reduction="sum")
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + ctx.step_size * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - ctx.eps), x + ctx.eps), 0.0, 1.0)
    student.train()
    peer.train()

    def kl_mean(logits: Tensor, target_logits: Tensor, tau: float) -> Tensor:  # nn.KLDivLoss(): mean over B·C
        target = F.softmax(target_logits / tau, dim=1)
        return F.kl_div(F.log_softmax(logits / tau, dim=1), target, reduction="sum") / target.numel()

    p_adv = peer(x_adv)
    loss_peer = hp.gamma1 * F.cross_entropy(p_adv, y) + hp.gamma2 * hp.tau_p ** 2 * kl_mean(p_adv, student(x_adv), hp.tau_p)
    s_adv, s_clean = student(x_adv), student(x)
    loss_student = (hp.lambda1 * F.cross_entropy(s_adv, y) + hp.lambda2 * hp.tau ** 2 * kl_mean(s_adv, p_adv.detach(), hp.tau)
                    + hp.lambda3 * hp.tau ** 2 * kl_mean(s_adv, s_clean, hp.tau))
    for opt in trainer.optimizers.values():
        opt.zero_grad(set_to_none=True)
    (loss_peer + loss_student).backward()
    for opt in trainer.optimizers.values():
        opt.step()


@dataclass
class Variant:
    """One contestant of a race: a trainer, the step it runs, its own batches."""

    name: str
    trainer: Any
    step: Callable[[Tensor, Tensor], Any]

    def __post_init__(self):
        self.data = batches(self.trainer)


def race(variants: list[Variant], steps: int, rounds: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Alternate the variants, ``steps`` steps each per round (the order rotates every round);
    per variant the median images/s and the median over rounds of its speed-up over ``variants[0]``."""
    def go(v: Variant, n: int) -> Timing:
        torch.set_num_threads(v.trainer.cfg.threads or v.trainer.s.cpus)
        return run_steps(v.step, v.data, n, v.trainer.device)

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
    a = bench.args
    off = dataclasses.asdict(fastpath.FastPath())
    strict, fast = {**off, **STRICT}, {**off, **FAST, "compile": a.compile}
    authors = bench.trainer(bench.config("peeraid", precision="fp32", **off))
    ours = bench.trainer(bench.config("peeraid", precision="fp32", **strict))
    quick = bench.trainer(bench.config("peeraid", precision="bf16", **fast))
    ctx = authors.step_context(0)
    variants = [Variant("authors_fp32", authors, lambda x, y: authors_peeraid_step(authors, x, y, ctx)),
                Variant("ours_fp32", ours, production_step(ours)),
                Variant("ours_fast", quick, production_step(quick))]
    out = race(variants, a.steps, a.rounds, a.warmup)
    out["authors_fp32"]["passes"] = count_passes(authors, variants[0].step, batches(authors))
    out["ours_fp32"]["passes"] = count_passes(ours, variants[1].step, batches(ours))
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
    variants = []
    for name, changes in settings.items():
        trainer = bench.trainer(bench.config(method, **{**off, "precision": "fp32", **changes}))
        variants.append(Variant(name, trainer, production_step(trainer)))
    return race(variants, a.steps, a.rounds, a.warmup)


def _epoch_times(config: dict) -> tuple[list[float], float]:
    """Launch one run (in a fresh process): its train/epoch_time_s per epoch and its wall time (s)."""
    from .checkpoint import STATE_FILE, safe_load
    from .train import launch

    t0 = time.perf_counter()
    summary = launch(TrainConfig.from_dict(config), quiet=True)
    wall = time.perf_counter() - t0
    return [h["train/epoch_time_s"] for h in safe_load(Path(summary["checkpoint"]) / STATE_FILE)["history"]], wall


def _idle_ray(ready: str, stop: str) -> None:
    """A local Ray instance running a 1-worker TorchTrainer (holding all CPUs) whose function only
    waits: every process a Ray run has (daemons, controller, Ray Train's helper actors, the worker),
    none of them working. The function touches ``ready`` once it runs and returns once ``stop`` exists."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .train import cpus_each, init_ray

    def wait(_config: dict) -> None:
        Path(ready).touch()
        while not os.path.exists(stop):
            time.sleep(0.5)

    init_ray(log_to_driver=False)
    cpus = float(cpus_each(1))  # all of them, as a 1-worker run holds
    TorchTrainer(wait, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name="idle-ray", storage_path=os.path.join(os.path.dirname(ready), "ray"))).fit()


def process_tree_ticks(root: int) -> dict[int, int] | None:
    """CPU time (user + system, in clock ticks) used so far by process ``root`` and by each of its
    living descendants, by pid; None where there is no /proc (not Linux)."""
    if not os.path.isdir("/proc"):
        return None
    procs: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
            procs[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    tree, frontier = {root}, {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier} - tree
        tree |= frontier
    return {pid: procs[pid][1] for pid in tree if pid in procs}


class IdleRay:
    """``with IdleRay(workdir):`` an idle Ray instance (``_idle_ray``) runs beside the block, in its own
    process, from the moment its worker runs plus ``settle_s`` (its daemons' start-up burst) to the
    block's end. After the block ``cpu_pct`` is the CPU time its processes (that process and all its
    descendants: GCS, raylet, dashboard, agents, controller, Ray Train's helpers, the waiting worker)
    used during the block, as a percentage of all this machine's CPUs over the block's wall time
    (None without /proc): the share of the machine Ray takes from whatever runs beside it."""

    def __init__(self, workdir: str, settle_s: float = 15.0, timeout_s: float = 180.0):
        self.dir = tempfile.mkdtemp(prefix="idle-ray-", dir=workdir)
        self.ready, self.stop = os.path.join(self.dir, "ready"), os.path.join(self.dir, "stop")
        self.settle_s, self.timeout_s = settle_s, timeout_s
        self.cpu_pct: float | None = None
        self._ticks: dict[int, int] | None = None

    def __enter__(self) -> "IdleRay":
        import multiprocessing

        self.proc = multiprocessing.get_context("spawn").Process(target=_idle_ray, args=(self.ready, self.stop))
        self.proc.start()
        deadline = time.monotonic() + self.timeout_s
        while not os.path.exists(self.ready):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("the idle Ray instance did not start its worker")
            time.sleep(0.5)
        time.sleep(self.settle_s)
        self._ticks, self._t0 = process_tree_ticks(self.proc.pid), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        if self._ticks is not None:  # measured from the end of __enter__
            from .engine import usable_cpus

            ticks = process_tree_ticks(self.proc.pid) or {}
            used_s = sum(t - self._ticks.get(pid, 0) for pid, t in ticks.items()) / os.sysconf("SC_CLK_TCK")
            self.cpu_pct = 100 * used_s / (usable_cpus() * (time.monotonic() - self._t0))
        Path(self.stop).touch()
        self.proc.join(self.timeout_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


def ray_overhead(bench: Bench, method: str) -> dict[str, Any]:
    """Steady-state train/epoch_time_s of a 1-worker TorchTrainer run and of the in-process loop, same
    config (an epoch = ``--steps`` batches). ``--rounds`` pairs of runs, each run in a fresh process,
    the order alternating (in-process then Ray, Ray then in-process, ...: drift cancels). Per run the
    median epoch time over its epochs after the first ``--ray-skip-epochs`` (default: half of them:
    a fresh local Ray instance's daemons start up for ~10-20 s beside the first epochs, a one-off
    cost that is reported as the runs' wall time instead); the overhead is the median over pairs of
    Ray / in-process - 1 (the figure to quote), with the pooled medians beside it.

    With ``--beside-idle-ray`` each round has a third run: the in-process loop while an idle Ray
    instance (``IdleRay``) runs beside it; its slowdown against the plain in-process run is the part of
    the overhead that is Ray's own processes competing for the CPU, not anything in the worker; and
    the CPU time those processes used meanwhile, as a share of the machine's CPUs (``idle_ray_cpu_pct``:
    with the loop on every CPU, the overhead can be no smaller than this share)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    a = bench.args
    skip = a.ray_skip_epochs if a.ray_skip_epochs is not None else a.ray_epochs // 2
    modes = ("in_process", "beside_idle_ray", "ray") if a.beside_idle_ray else ("in_process", "ray")
    out: dict[str, Any] = {"skipped_epochs": skip, "pair_overheads_pct": [],
                           **{m: {"epoch_times_s": [], "run_medians_s": [], "run_walls_s": []} for m in modes}}
    if a.beside_idle_ray:
        out["pair_beside_idle_ray_pct"], out["idle_ray_cpu_pcts"] = [], []
    for r in range(a.rounds):
        pair = {}
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            cfg = bench.config(method)
            cfg.in_process, cfg.workers, cfg.epochs, cfg.lr_milestones = mode != "ray", 1, a.ray_epochs, []
            cfg.swa_start, cfg.test_attacks, cfg.val_size = None, ["clean"], 2 * bench.num_classes
            cfg.name, cfg.tracking_uri = f"bench-{r}-{mode}", f"sqlite:///{bench.workdir}/mlflow.db"
            beside = IdleRay(bench.workdir) if mode == "beside_idle_ray" else contextlib.nullcontext()
            with beside, ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                times, wall = pool.submit(_epoch_times, cfg.to_dict()).result()
            steady = times[skip:]
            out[mode]["epoch_times_s"] += steady
            out[mode]["run_walls_s"].append(wall)
            pair[mode] = statistics.median(steady)
            if mode == "beside_idle_ray":
                out["idle_ray_cpu_pcts"].append(beside.cpu_pct)
            out[mode]["run_medians_s"].append(pair[mode])
        out["pair_overheads_pct"].append(100 * (pair["ray"] / pair["in_process"] - 1))
        beside_text = ""
        if a.beside_idle_ray:
            out["pair_beside_idle_ray_pct"].append(100 * (pair["beside_idle_ray"] / pair["in_process"] - 1))
            beside_text = f", in-process beside idle Ray {pair['beside_idle_ray']:.3f}s = {out['pair_beside_idle_ray_pct'][-1]:+.1f}%"
            if out["idle_ray_cpu_pcts"][-1] is not None:
                beside_text += f" (idle Ray's processes: {out['idle_ray_cpu_pcts'][-1]:.1f}% of the CPUs)"
        print(f"ray-overhead round {r + 1}/{a.rounds}: in-process {pair['in_process']:.3f}s, "
              f"Ray {pair['ray']:.3f}s per epoch = {out['pair_overheads_pct'][-1]:+.1f}%{beside_text} (run walls: in-process "
              f"{out['in_process']['run_walls_s'][-1]:.1f}s, Ray {out['ray']['run_walls_s'][-1]:.1f}s)", flush=True)
    for mode in modes:
        out[mode]["epoch_time_s"] = statistics.median(out[mode]["epoch_times_s"])
    out["pooled_overhead_pct"] = 100 * (out["ray"]["epoch_time_s"] / out["in_process"]["epoch_time_s"] - 1)
    out["overhead_pct"] = statistics.median(out["pair_overheads_pct"])
    if a.beside_idle_ray:
        out["beside_idle_ray_pct"] = statistics.median(out["pair_beside_idle_ray_pct"])
        shares = [c for c in out["idle_ray_cpu_pcts"] if c is not None]
        out["idle_ray_cpu_pct"] = statistics.median(shares) if shares else None
    out["target_pct"] = 5.0
    return out


def pgd20_check(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """PGD-20 accuracy of a fixed model in fp32 and on the fast path (bf16 autocast, channels_last,
    folded BatchNorm) on the first ``--eval-examples`` test images of the checkpoint's dataset (else
    ``--dataset``), with its eps and step size, the same random starts."""
    from .checkpoint import load_model
    from .data import load_dataset
    from .evaluation import evaluate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_model(path, device)
    dataset = meta.get("dataset") or args.dataset
    d = load_dataset(dataset, data_dir=args.data_dir or meta.get("data_dir"), val_size=0)
    x, y = d.test_x[:args.eval_examples], d.test_y[:args.eval_examples]
    eps, step = float(meta.get("eps", 8 / 255)), float(meta.get("step_size", 2 / 255))
    kw = dict(eps=eps, step_size=step, batch_size=args.eval_batch_size, device=device)
    fp32 = evaluate(model, x, y, ["pgd20"], **kw)["pgd20_acc"]
    fast_model = fastpath.prepare(copy.deepcopy(model), fastpath.FastPath(channels_last=True, fold_bn=True))
    with fastpath.autocast(device, "bf16"):
        fast = evaluate(fastpath.inference_view(fast_model), x, y, ["pgd20"], **kw)["pgd20_acc"]
    return {"checkpoint": path, "dataset": dataset, "n_examples": len(y), "pgd20_acc_fp32": fp32,
            "pgd20_acc_fast": fast, "difference_points": 100 * (fast - fp32), "target_points": 0.5}


# ============================================================================= command line
def parser() -> ArgParser:
    p = ArgParser(prog="python -m raydistill.bench",
                  description="Training-throughput benchmark: images/s of each method's production step, its "
                              "passes per network, evaluation speed, memory; races against the authors' PeerAiD step.")
    p.add_argument("--methods", default="pgd_at,peeraid", help="comma-separated methods (default pgd_at,peeraid)")
    p.add_argument("--student", default="resnet18", help="student architecture (default resnet18)")
    p.add_argument("--peer", help="peer architecture of online methods (default: the student's)")
    p.add_argument("--dataset", default="synthetic", help="synthetic (default; any shape) or a dataset name")
    p.add_argument("--data-dir", help="dataset folder (not needed for synthetic)")
    p.add_argument("--image-size", type=positive_int, default=32, help="synthetic images' side (default 32)")
    p.add_argument("--num-classes", type=positive_int, default=10, help="synthetic classes (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps (per round in races; default 10)")
    p.add_argument("--warmup", type=positive_int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--attack-steps", type=positive_int, default=10, help="PGD steps of the training attack (default 10)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=positive_int, help="intra-op threads (default: the CPUs this process may use)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="a hyperparameter of the methods that have it (repeatable)")
    p.add_argument("--eval-examples", type=positive_int, default=256, help="test images for the evaluation speed")
    p.add_argument("--eval-batch-size", type=positive_int, default=256)
    fastpath.add_options(p.add_argument_group("speed features (see raydistill.fastpath)"))
    g = p.add_argument_group("modes")
    g.add_argument("--compare-authors-peeraid", action="store_true",
                   help="race the authors'-code PeerAiD step against ours (strict fp32 and fast path)")
    g.add_argument("--ablation", action="store_true", help="race the first method's step with each feature")
    g.add_argument("--rounds", type=positive_int, default=5,
                   help="rounds of the races; with --ray-overhead, pairs of runs (default 5)")
    g.add_argument("--ray-overhead", action="store_true",
                   help="also compare a 1-worker TorchTrainer run's epoch time with the in-process loop")
    g.add_argument("--beside-idle-ray", action="store_true",
                   help="with --ray-overhead: also time the in-process loop beside an idle Ray instance (Ray's "
                        "processes running, none of them working): the part of the overhead that is CPU contention")
    g.add_argument("--ray-epochs", type=positive_int, default=6, help="epochs of those runs (default 6)")
    g.add_argument("--ray-skip-epochs", type=nonneg_int,
                   help="epochs of each run not timed (default: half; Ray's daemons start up beside the first)")
    g.add_argument("--pgd20-check", metavar="CHECKPOINT", help="PGD-20 accuracy of a checkpoint: fp32 vs fast path")
    p.add_argument("--summary-json", help="write the results as JSON here")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    from .config import parse_set
    from .methods import get_method
    from .models import MODELS

    args = parser().parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        raise UsageError("--methods is empty; give e.g. --methods pgd_at,peeraid")
    classes = [get_method(m) for m in args.methods]
    for arch in (args.student, args.peer):
        if arch is not None:
            MODELS.get(arch)
    if args.dataset not in DATASET_NAMES:
        raise UsageError(f"unknown dataset '{args.dataset}'; choose from: {', '.join(DATASET_NAMES)}")
    args.hp = parse_set(args.set)
    for name in args.hp:
        if not any(name in c.hparams for c in classes):
            raise UsageError(f"--set {name}: none of {', '.join(args.methods)} has a hyperparameter '{name}'")
    defaults = fastpath.FastPath()
    for f in dataclasses.fields(defaults):
        if getattr(args, f.name) is None:
            setattr(args, f.name, getattr(defaults, f.name))
    if args.beside_idle_ray and not args.ray_overhead:
        raise UsageError("--beside-idle-ray is a part of --ray-overhead: give both")
    if args.ray_skip_epochs is not None and args.ray_skip_epochs >= args.ray_epochs:
        raise UsageError(f"--ray-skip-epochs {args.ray_skip_epochs} leaves none of --ray-epochs {args.ray_epochs} to time")
    if args.pgd20_check and not os.path.exists(args.pgd20_check):
        raise UsageError(f"--pgd20-check '{args.pgd20_check}' does not exist")
    if args.summary_json:
        folder = Path(args.summary_json).expanduser().resolve().parent
        if folder.exists() and not os.access(folder, os.W_OK):
            raise UsageError(f"--summary-json {args.summary_json}: folder is not writable")
    return args


def print_result(r: dict[str, Any]) -> None:
    passes = "  ".join(f"{n} {p['forward']}f/{p['backward']}b" for n, p in r["passes"].items())
    mem = f"{r['peak_mem_mb']:.0f} MiB" if r["peak_mem_mb"] is not None else "n/a"
    print(f"{r['method']:>8}: {r['images_per_s']:8.1f} img/s train | eval clean "
          f"{r['eval_images_per_s']['clean']:.0f}, pgd20 {r['eval_images_per_s']['pgd20']:.1f} img/s | "
          f"data {100 * r['data_share']:.1f}% | {passes} | peak {mem}", flush=True)


def print_report(out: dict[str, Any]) -> None:
    """Everything but the per-method rows, which are printed as each method finishes."""
    for key in ("ablation", "compare_authors_peeraid"):
        for name, v in out.get(key, {}).items():
            print(f"{key} {name:>28}: {v['images_per_s']:8.1f} img/s  x{v['speedup']:.3f} (median of rounds)")
    if "compare_authors_peeraid" in out:
        c = out["compare_authors_peeraid"]
        print(f"PeerAiD vs the authors' step: strict fp32 x{c['ours_fp32']['speedup']:.3f} (target >= 1.05), "
              f"fast path x{c['ours_fast']['speedup']:.3f} (target >= 2.0)")
    if "ray_overhead" in out:
        r = out["ray_overhead"]
        print(f"Ray overhead: {r['overhead_pct']:+.1f}% (median of {len(r['pair_overheads_pct'])} pairs, from "
              f"{min(r['pair_overheads_pct']):+.1f}% to {max(r['pair_overheads_pct']):+.1f}%; target <= 5%); pooled "
              f"epoch {r['ray']['epoch_time_s']:.3f}s vs in-process {r['in_process']['epoch_time_s']:.3f}s"
              f" = {r['pooled_overhead_pct']:+.1f}%")
        if "beside_idle_ray_pct" in r:
            p = r["pair_beside_idle_ray_pct"]
            print(f"In-process loop beside an idle Ray instance: {r['beside_idle_ray_pct']:+.1f}% (median of {len(p)} "
                  f"rounds, from {min(p):+.1f}% to {max(p):+.1f}%): Ray's processes competing for the CPU")
        if r.get("idle_ray_cpu_pct") is not None:
            print(f"Idle Ray's processes used {r['idle_ray_cpu_pct']:.1f}% of this machine's CPUs (median of rounds): "
                  f"a loop on all of them loses at least that share of them to Ray")
    if "pgd20_check" in out:
        c = out["pgd20_check"]
        print(f"PGD-20 on {c['n_examples']} images: fp32 {c['pgd20_acc_fp32']:.4f}, fast path "
              f"{c['pgd20_acc_fast']:.4f}, difference {c['difference_points']:+.2f} points (target within 0.5)")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {"machine": machine(device)}
    if args.pgd20_check:
        out["pgd20_check"] = pgd20_check(args.pgd20_check, args)
    else:
        with tempfile.TemporaryDirectory(prefix="raydistill-bench-") as workdir:
            bench = Bench(args, workdir)
            if args.compare_authors_peeraid:
                out["compare_authors_peeraid"] = compare_authors_peeraid(bench)
            elif args.ablation:
                out["ablation"] = ablation(bench, args.methods[0])
            else:
                out["results"] = []
                for m in args.methods:  # one line per method as it finishes: a long benchmark shows progress
                    out["results"].append(bench_method(bench, m))
                    print_result(out["results"][-1])
            if args.ray_overhead:
                out["ray_overhead"] = ray_overhead(bench, args.methods[0])
            out["machine"]["threads"] = torch.get_num_threads()
    print_report(out)
    if args.summary_json:
        from .train import write_json

        write_json(args.summary_json, out)
    return 0


run = cli_entry(main)

if __name__ == "__main__":
    run()
