"""The one training loop, run as Ray Train TorchTrainer's per-worker function or in-process.

Per epoch: every trained network steps once per batch (one backward over the sum of the method's
loss terms, one SGD optimizer per network with the piecewise learning-rate decay), the student's
weights are averaged (SWA) from ``swa_start`` with a BatchNorm refresh, the student (and its
average) is validated on clean and PGD-10 inputs, the method's diagnostics are averaged, the best
student by PGD-10 is kept, a checkpoint is written and reported, and rank 0 logs to MLflow.
After the last epoch the best checkpoint is evaluated on the test split.

Resume: the checkpoint holds every network, optimizer, the averaged weights, the epoch, the RNG
state and the metric history, so a restarted worker group (or a relaunch with the same --name,
also with another worker count) continues exactly where the last checkpoint left off. Metrics
are logged to MLflow only after their checkpoint is persisted, and on resume any epoch in the
checkpoint's history that MLflow lacks is logged first; an epoch MLflow already has (logged
before a crash that lost its checkpoint, then redone) is not logged again: every epoch appears
exactly once.
"""
from __future__ import annotations

import copy
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import fastpath
from .checkpoint import MODEL_FILE, STATE_FILE, atomic_save, load_model, model_record, safe_load
from .config import TrainConfig
from .data import iterate_batches, load_dataset
from .methods import HP, Nets, StepContext, get_method
from .models import build_model

LAST_MODEL_FILE = "last_model.pt"
WORKER_SWITCH_INTERVAL_S = 0.05  # the GIL switch interval in Ray Train workers (see train_worker)


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite: the run stops with this reason."""


# ============================================================================= sessions
def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class LocalSession:
    """In-process execution: checkpoints under ``run_dir/checkpoint_NNNNNN``, newest resumed."""

    rank, world_size, local_world_size = 0, 1, 1

    def __init__(self, run_dir: str, cpus: float | None = None):
        self.run_dir = Path(run_dir)
        self.cpus = max(1, int(cpus)) if cpus else usable_cpus()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.final_metrics: dict[str, Any] = {}
        self.checkpoint_path: str | None = None

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.run_dir.glob("checkpoint_*") if (p / STATE_FILE).exists())
        return done[-1] if done else None

    def load_checkpoint(self) -> dict | None:
        path = self.latest_checkpoint()
        if path is None:
            return None
        self.checkpoint_path = str(path)
        return safe_load(path / STATE_FILE, "resume checkpoint")

    def report(self, metrics: dict, checkpoint_dir: str | None, repeated: bool = False) -> None:
        if checkpoint_dir is not None:
            epoch = int(metrics["epoch"])
            final = self.run_dir / checkpoint_name(epoch)
            tmp = self.run_dir / f".tmp_{checkpoint_name(epoch)}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # the folder appears complete or not at all
            self.checkpoint_path = str(final)
            for old in sorted(self.run_dir.glob("checkpoint_*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        self.final_metrics = dict(metrics)


class RaySession:
    """Inside a Ray Train worker: DDP via prepare_model, checkpoints via ray.train.report."""

    def __init__(self):
        import ray
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_world_size = ctx.get_local_world_size()
        self.device = ray.train.torch.get_device()
        self.cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))

    def prepare(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=True)

    def load_checkpoint(self) -> dict | None:
        """The newest complete checkpoint: Ray's latest registered one, or a newer one in the run's
        storage that Ray never registered.

        Ray Train registers a checkpoint only once its controller has collected the report of every
        rank, which it polls every few seconds; a worker that dies in between leaves the epoch's
        checkpoint persisted (rank 0 uploads it before its report returns) but unknown to Ray.
        Checkpoint folders are named by epoch (``checkpoint_NNNNNN``), so such a folder is found
        here; one that a crash left half-uploaded does not load and is passed over."""
        import ray.train

        registered = ray.train.get_checkpoint()
        newest = _checkpoint_epoch(registered.path) if registered is not None else -1
        storage = ray.train.get_context().get_storage()
        for epoch, path in reversed(self._stored_checkpoints(storage)):
            if epoch <= newest:
                break
            try:
                state = self._read(ray.train.Checkpoint(path, filesystem=storage.storage_filesystem))
            except Exception:  # half-written by a worker that died while uploading it
                continue
            if self.rank == 0:
                print(f"[raydistill] {path.rsplit('/', 1)[-1]} was persisted but not registered by Ray "
                      f"before the failure; resuming from it", flush=True)
            return state
        return self._read(registered) if registered is not None else None

    @staticmethod
    def _stored_checkpoints(storage) -> list[tuple[int, str]]:
        """(epoch, path) of every checkpoint folder in the run's storage, oldest first."""
        from pyarrow.fs import FileSelector, FileType

        infos = storage.storage_filesystem.get_file_info(FileSelector(storage.experiment_fs_path, allow_not_found=True))
        found = [(_checkpoint_epoch(i.path), i.path) for i in infos if i.type == FileType.Directory]
        return sorted(f for f in found if f[0] >= 0)

    @staticmethod
    def _read(ckpt) -> dict:
        with ckpt.as_directory() as d:
            return safe_load(Path(d) / STATE_FILE, "resume checkpoint")

    def report(self, metrics: dict, checkpoint_dir: str | None, repeated: bool = False) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # named by epoch (on every rank: Ray checks that the names agree) so that load_checkpoint finds
        # it; a finished run's epoch reported again gets Ray's default name: a folder Ray registered
        # once is never written twice (Ray deletes old checkpoints by folder)
        name = None if repeated else checkpoint_name(int(metrics["epochs_completed"]))
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


def checkpoint_name(epochs_completed: int) -> str:
    return f"checkpoint_{epochs_completed:06d}"


def _checkpoint_epoch(path: str) -> int:
    """N of a folder named ``checkpoint_NNNNNN`` (the epochs it holds), else -1."""
    m = re.fullmatch(r"checkpoint_(\d{6})", str(path).rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


def note_worker_niceness() -> None:
    """Rank 0 of a CPU run says so when Ray runs it niced (its worker_niceness, 15 unless the cluster was
    started with RAY_worker_niceness=0 as train.init_ray and clusters/ do)."""
    import ray.train

    nice = os.nice(0)
    if nice > 0 and not torch.cuda.is_available() and ray.train.get_context().get_world_rank() == 0:
        print(f"[raydistill] note: Ray runs this worker at nice {nice}, below its own daemons; on a CPU node "
              "that costs speed: start Ray with RAY_worker_niceness=0 in the environment of `ray start`", flush=True)


def train_worker(config: dict) -> None:
    """TorchTrainer's ``train_loop_per_worker``."""
    import logging

    # our own progress line says enough; some Ray Train modules name their logger by file path
    # ("Reporting training result ..." at INFO, once per epoch and rank)
    by_path = os.path.join("ray", "train", "")
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("ray.train") or by_path in n] + ["ray.train"]:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Train runs this function in a thread of the worker actor, whose main thread asks for the GIL
    # every 10 ms (Ray's signal check). At CPython's default switch interval (5 ms) each request takes
    # the GIL from the training thread; while it waits to get it back, the intra-op (OpenMP) threads
    # stop spinning and go to sleep, and every later parallel region has to wake them: a step of
    # small kernels ran at half speed (small CNN PGD-AT step, 2 threads: 66 ms vs 30 ms in the
    # actor's main thread or a plain process). At 50 ms Ray's threads still get the GIL within 50 ms
    # (torch releases it in every operator; the controller's health checks allow minutes), and the
    # step no longer runs at half speed (BENCHMARKS.md, "Ray Train's overhead").
    previous = sys.getswitchinterval()
    sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)
    try:
        note_worker_niceness()
        Trainer(TrainConfig.from_dict(config), RaySession()).run()
    finally:
        sys.setswitchinterval(previous)


# ============================================================================= the loop
def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Piecewise-constant decay: lr * gamma^(number of milestones <= epoch)."""
    return cfg.lr * cfg.lr_gamma ** sum(1 for m in cfg.lr_milestones if epoch >= m)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class Trainer:
    def __init__(self, cfg: TrainConfig, session):
        self.cfg, self.s = cfg, session
        self.is_main = session.rank == 0

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg, s = self.cfg, self.s
        torch.set_num_threads(cfg.threads or s.cpus)  # exactly the CPUs this worker holds: no oversubscription
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.device = s.device
        self.data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                                 val_size=cfg.val_size, **cfg.dataset_options)
        d = self.data
        for split in ("train", "val", "test"):  # the data lives on the device: no loader waits
            setattr(d, f"{split}_x", getattr(d, f"{split}_x").to(self.device))
            setattr(d, f"{split}_y", getattr(d, f"{split}_y").to(self.device))
        self.method = get_method(cfg.method)(cfg)
        self.specs = self.method.networks()
        wrapped, raw = {}, {}
        for spec in self.specs:
            if spec.trainable:
                m = fastpath.prepare(build_model(spec.arch, d.num_classes, d.in_shape), cfg)
                wrapped[spec.name] = s.prepare(m)
                raw[spec.name] = getattr(wrapped[spec.name], "module", wrapped[spec.name])
            else:
                m, _ = load_model(spec.checkpoint, self.device, arch=spec.arch or None, num_classes=d.num_classes,
                                  in_shape=d.in_shape, what=spec.flag or spec.name)
                m = fastpath.prepare(m.requires_grad_(False).eval(), cfg, frozen=True)
                wrapped[spec.name] = raw[spec.name] = m
        self.nets = Nets(wrapped, raw, self.specs)
        self.trainable = [sp.name for sp in self.specs if sp.trainable]
        self.students = [n for n in self.trainable if n.startswith("student")]
        self.selected = self.students[0]  # the most robust student (several with CAT-AKA)
        self.optimizers = {n: torch.optim.SGD(raw[n].parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                              weight_decay=cfg.weight_decay) for n in self.trainable}
        self.swa = (torch.optim.swa_utils.AveragedModel(raw["student"])
                    if cfg.swa_start is not None and "student" in raw else None)
        self.start_epoch, self.history = 0, []
        self.best = {"pgd10": -1.0, "epoch": -1, "student": self.selected, "state_dict": None}
        self.restore(s.load_checkpoint())
        self.per_worker_batch = max(1, cfg.batch_size // s.world_size)
        self.logger = None
        if self.is_main and cfg.mlflow_run_id:
            from .tracking import EpochLogger

            self.logger = EpochLogger(cfg.tracking_uri, cfg.mlflow_run_id)
            self.logger.backfill(self.history)

    def restore(self, state: dict | None) -> None:
        if state is None:
            return
        for n in self.trainable:
            self.nets._module(n).load_state_dict(state["nets"][n])
            self.optimizers[n].load_state_dict(state["optimizers"][n])
        if self.swa is not None and state.get("swa") is not None:
            self.swa.load_state_dict(state["swa"])
        self.start_epoch = int(state["epoch"])
        self.best = state["best"]
        self.selected = self.best.get("student", self.selected)
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_tuple(state["rng"]["python"]))
        if torch.cuda.is_available() and state["rng"].get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.is_main:
            print(f"[raydistill] resumed from epoch {self.start_epoch} (best PGD-10 {self.best['pgd10']:.4f} at epoch {self.best['epoch']})", flush=True)

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, d = self.cfg, self.data
        for n in self.trainable:
            self.nets._module(n).train()
            for g in self.optimizers[n].param_groups:
                g["lr"] = lr_at(cfg, epoch)
        ctx = self.step_context(epoch)
        sums: dict[str, torch.Tensor] = {}
        n_batches = math.ceil(math.ceil(len(d.train_y) / self.s.world_size) / self.per_worker_batch)
        images, t0 = 0, time.perf_counter()
        batches = iterate_batches(d.train_x, d.train_y, self.per_worker_batch, shuffle=True, seed=cfg.seed,
                                  epoch=epoch, rank=self.s.rank, world_size=self.s.world_size, augment=True,
                                  crop_pad=d.crop_pad, hflip=d.hflip, device=self.device)
        for i, (x, y) in enumerate(batches):
            ctx.epoch = epoch + i / n_batches  # held by ctx.hp, which evaluates the schedules at it
            if i == n_batches // 2:
                self.maybe_fault(epoch, "kill")
            losses = self.train_step(x, y, ctx)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * len(y)
            images += len(y)
        elapsed = time.perf_counter() - t0
        names = sorted(sums)
        totals = all_reduce_sum([float(sums[k]) for k in names] + [float(images)], self.device)
        seen = totals[-1]
        out = {f"train/loss_{k}": v / seen for k, v in zip(names, totals)}
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLoss(f"loss became non-finite in epoch {epoch} ({', '.join(bad)}); "
                                f"lower --lr or the loss weights")
        stat_names = sorted(ctx.stats)
        stats = all_reduce_sum([float(ctx.stats[k][0]) for k in stat_names] + [float(ctx.stats[k][1]) for k in stat_names], self.device)
        for j, k in enumerate(stat_names):
            out[f"train/{k}"] = stats[j] / max(1.0, stats[len(stat_names) + j])
        out["train/images_per_s"] = seen / max(elapsed, 1e-9)
        out["train/lr"] = lr_at(cfg, epoch)
        out["train/epoch_time_s"] = elapsed
        return out

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """One optimisation step of every trained network: the method's inner maximisation and
        outer minimisation (under bf16 autocast on the fast path), one backward over the summed
        loss terms, one SGD step per network. Returns the (graph-holding) loss terms."""
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.precision == "bf16"
                    else nullcontext())
        with autocast:
            losses = self.method.step(self.nets, x, y, ctx)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        for opt in self.optimizers.values():
            opt.step()
        return losses

    def step_context(self, epoch: float = 0.0) -> StepContext:
        cfg = self.cfg
        return StepContext(eps=cfg.eps, step_size=cfg.step_size, attack_steps=cfg.attack_steps, hp=HP(cfg.hp, epoch))

    def sync_buffers(self) -> None:
        """BatchNorm statistics from rank 0 to every rank, so all ranks validate and save one model
        (DDP keeps parameters identical; running statistics drift with each rank's batches)."""
        if self.s.world_size == 1 or not dist.is_initialized():
            return
        for n in self.trainable:
            for b in self.nets._module(n).buffers():
                dist.broadcast(b.data, src=0)

    def maybe_fault(self, epoch: int, when: str) -> None:
        """Testing hook: ``cfg.fault`` is a comma-separated list of ``WHEN:EPOCH:RANK:MARKER``; the worker
        of that rank SIGKILLs itself once (the marker file records it) at that point of epoch EPOCH
        (0-based): WHEN = ``kill`` halfway through the epoch's batches, ``kill-after-report`` right
        after the epoch's checkpoint is reported (before Ray's controller can register it)."""
        for fault in (self.cfg.fault or "").split(","):
            kind, e, r, marker = fault.split(":", 3) if fault.count(":") >= 3 else ("", "-1", "-1", "")
            if kind == when and int(e) == epoch and int(r) == self.s.rank and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ evaluation
    def shard(self, x: torch.Tensor, y: torch.Tensor):
        return x[self.s.rank::self.s.world_size], y[self.s.rank::self.s.world_size]

    def robust_eval(self, model: nn.Module, x, y, attacks: list[str], prefix: str) -> dict[str, float]:
        """Accuracy under ``attacks`` on this rank's shard, summed over ranks."""
        from .evaluation import evaluate

        xs, ys = self.shard(x, y)
        # evaluation in fp32 whatever --precision says; a folded copy (--fold-bn) is the same function
        accs = evaluate(fastpath.inference_view(model), xs, ys, attacks, eps=self.cfg.eps, step_size=self.cfg.step_size,
                        batch_size=max(256, self.per_worker_batch), device=self.device) if len(ys) else {}
        keys = [f"{a}_acc" for a in attacks]
        tot = all_reduce_sum([accs.get(k, 0.0) * len(ys) for k in keys] + [float(len(ys))], self.device)
        return {f"{prefix}{k}": v / max(1.0, tot[-1]) for k, v in zip(keys, tot)}

    def validate(self) -> dict[str, float]:
        d = self.data
        if len(self.students) == 1:
            out = self.robust_eval(self.nets._module(self.selected), d.val_x, d.val_y, ["clean", "pgd10"], "val/")
        else:  # every student reported; the most robust one is selected
            out = {}
            for n in self.students:
                out.update(self.robust_eval(self.nets._module(n), d.val_x, d.val_y, ["clean", "pgd10"], f"val/{n}_"))
            self.selected = max(self.students, key=lambda n: out[f"val/{n}_pgd10_acc"])
            out["val/clean_acc"] = out[f"val/{self.selected}_clean_acc"]
            out["val/pgd10_acc"] = out[f"val/{self.selected}_pgd10_acc"]
            out["val/selected_student"] = float(self.students.index(self.selected))
        if self.swa is not None and self.swa.n_averaged.item() > 0:
            out.update(self.robust_eval(self.swa.module, d.val_x, d.val_y, ["clean", "pgd10"], "val/swa_"))
        out.update(self.diagnostics())
        return out

    def diagnostics(self) -> dict[str, float]:
        ctx = self.step_context(len(self.history))
        xs, ys = self.shard(self.data.val_x, self.data.val_y)
        sums: dict[str, float] = {}
        modes = {n: self.nets._module(n).training for n in self.nets.names()}
        for n in self.nets.names():
            self.nets._module(n).eval()
        for x, y in iterate_batches(xs, ys, max(256, self.per_worker_batch), shuffle=False, seed=0, epoch=0,
                                    device=self.device):
            for k, v in self.method.diagnostics(self.nets, x, y, ctx).items():
                sums[k] = sums.get(k, 0.0) + float(v.float().sum())
        for n, was in modes.items():
            self.nets._module(n).train(was)
        names = sorted(sums)
        if not names:
            return {}
        tot = all_reduce_sum([sums[k] for k in names] + [float(len(ys))], self.device)
        return {f"val/{k}": v / max(1.0, tot[-1]) for k, v in zip(names, tot)}

    def refresh_bn(self, model: nn.Module, epoch: int) -> None:
        """Recompute BatchNorm statistics of the averaged model over the training set."""
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        d = self.data
        momenta = {}
        for bn in bns:
            bn.reset_running_stats()
            momenta[bn] = bn.momentum
            bn.momentum = None  # cumulative average over all batches
        was = model.training
        model.train()
        with torch.no_grad():
            for x, _ in iterate_batches(d.train_x, d.train_y, self.per_worker_batch, shuffle=True,
                                        seed=self.cfg.seed + 7919, epoch=epoch, rank=self.s.rank,
                                        world_size=self.s.world_size, augment=True, crop_pad=d.crop_pad,
                                        hflip=d.hflip, device=self.device):
                model(x)
        for bn in bns:
            bn.momentum = momenta[bn]
        model.train(was)

    # ------------------------------------------------------------------ checkpoints
    def meta(self) -> dict:
        cfg = self.cfg
        return {"method": cfg.method, "dataset": cfg.dataset, "data_dir": cfg.data_dir, "eps": cfg.eps,
                "step_size": cfg.step_size, "seed": cfg.seed, "name": cfg.name, "student": self.best["student"]}

    def write_checkpoint(self, epoch_done: int, directory: str) -> None:
        d, cfg = self.data, self.cfg
        state = {
            "epoch": epoch_done,
            "nets": {n: _cpu(self.nets._module(n).state_dict()) for n in self.trainable},
            "optimizers": {n: self.optimizers[n].state_dict() for n in self.trainable},
            "swa": _cpu(self.swa.state_dict()) if self.swa is not None else None,
            "best": self.best,
            "history": self.history,
            "rng": {"torch": torch.get_rng_state(), "python": list(_listify(random.getstate())),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "config": cfg.to_dict(),
        }
        atomic_save(state, Path(directory) / STATE_FILE)
        meta = dict(self.meta(), epoch=self.best["epoch"], val_pgd10_acc=self.best["pgd10"])
        best = self.best["state_dict"] or state["nets"][self.selected]
        student = self.nets._module(self.selected)
        atomic_save({**model_record(student, cfg.student, d.num_classes, d.in_shape, meta),
                     "state_dict": best}, Path(directory) / MODEL_FILE)
        atomic_save(model_record(student, cfg.student, d.num_classes, d.in_shape,
                                 dict(self.meta(), epoch=epoch_done - 1)), Path(directory) / LAST_MODEL_FILE)

    # ------------------------------------------------------------------ run
    def run(self) -> None:
        self.setup()
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs):
            metrics = self.train_epoch(epoch)
            self.sync_buffers()
            if self.swa is not None and epoch >= cfg.swa_start:
                self.swa.update_parameters(self.nets._module("student"))
                self.refresh_bn(self.swa.module, epoch)
            metrics.update(self.validate())
            # the best checkpoint by validation PGD-10: the student or its weight average
            if metrics["val/pgd10_acc"] > self.best["pgd10"]:
                self.best = {"pgd10": metrics["val/pgd10_acc"], "epoch": epoch, "student": self.selected,
                             "state_dict": _cpu(self.nets._module(self.selected).state_dict()), "averaged": False}
            if metrics.get("val/swa_pgd10_acc", -1.0) > self.best["pgd10"]:
                self.best = {"pgd10": metrics["val/swa_pgd10_acc"], "epoch": epoch, "student": "student",
                             "state_dict": _cpu(self.swa.module.state_dict()), "averaged": True}
            metrics.update({"epoch": epoch + 1, "epochs_completed": epoch + 1,
                            "val/best_pgd10_acc": self.best["pgd10"]})
            self.history.append(metrics)
            if self.is_main:
                print(progress_line(epoch, cfg.epochs, metrics), flush=True)
            # the last epoch's report carries the test figures (Ray returns the last checkpointed metrics)
            self.report(dict(metrics, **self.test()) if epoch == cfg.epochs - 1 else metrics)
            self.maybe_fault(epoch, "kill-after-report")
            if self.logger:
                self.logger.log_epoch(epoch, metrics)
        if self.start_epoch >= cfg.epochs:  # relaunched after completion: just the test figures again
            self.report(dict(self.history[-1], **self.test()), repeated=True)
        if cfg.debug_dump:
            self.dump_weights(cfg.debug_dump)

    def dump_weights(self, folder: str) -> None:
        """Testing aid: each rank writes a digest of every trained network's weights."""
        import hashlib
        import json

        def digest(tensors) -> str:
            h = hashlib.sha256()
            for k, v in tensors:
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()

        digests = {}
        for n in self.trainable:
            digests[n] = digest(self.nets._module(n).named_parameters())
            digests[f"{n}.buffers"] = digest(self.nets._module(n).named_buffers())
        digests["ddp"] = {n: type(self.nets.__getattr__(n)).__name__ for n in self.trainable}
        digests["switch_interval_s"] = sys.getswitchinterval()
        digests["nice"] = os.nice(0)
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, f"rank{self.s.rank}.json").write_text(json.dumps(digests))

    def report(self, metrics: dict, repeated: bool = False) -> None:
        """Checkpoint (rank 0 writes it) and report; the test figures, if present, go to MLflow."""
        with tempfile.TemporaryDirectory(prefix="raydistill-ckpt-") as tmp:
            if self.is_main:
                self.write_checkpoint(int(metrics["epochs_completed"]), tmp)
            self.s.report(metrics, tmp if self.is_main else None, repeated)
        if self.logger and any(k.startswith("test/") for k in metrics):
            self.logger.log_final(metrics)

    def test(self) -> dict[str, float]:
        """Test-split figures of the best-PGD-10 student (and of the averaged student)."""
        cfg, d = self.cfg, self.data
        model = copy.deepcopy(self.nets._module(self.best["student"]))
        if self.best["state_dict"] is not None:
            model.load_state_dict(self.best["state_dict"])
        model.eval()
        out = {"best_epoch": self.best["epoch"] + 1, "best_is_averaged": float(self.best.get("averaged", False))}
        out.update(self.robust_eval(model, d.test_x, d.test_y, list(cfg.test_attacks), "test/"))
        if self.swa is not None and self.swa.n_averaged.item() > 0:
            out.update(self.robust_eval(self.swa.module, d.test_x, d.test_y, list(cfg.test_attacks), "test/swa_"))
        if self.is_main:
            which = "weight-averaged student" if self.best.get("averaged") else "student"
            print("[raydistill] test (best PGD-10 checkpoint: %s, epoch %d): %s" % (which, out["best_epoch"], "  ".join(
                f"{k[5:]} {v:.4f}" for k, v in out.items() if k.startswith("test/"))), flush=True)
        return out


def progress_line(epoch: int, epochs: int, m: dict) -> str:
    losses = " ".join(f"{k[len('train/loss_'):]}={v:.4f}" for k, v in m.items() if k.startswith("train/loss_"))
    vals = " ".join(f"{k[4:]}={v:.3f}" for k, v in m.items() if k.startswith("val/") and k != "val/best_pgd10_acc")
    return (f"[raydistill] epoch {epoch + 1}/{epochs} | loss {losses} | {vals} | "
            f"{m['train/images_per_s']:.0f} img/s | {m['train/epoch_time_s']:.1f}s")


def run_in_process(cfg: TrainConfig) -> LocalSession:
    session = LocalSession(cfg.run_dir(), cfg.cpus_per_worker)
    Trainer(cfg, session).run()
    return session


def _cpu(sd: dict) -> dict:
    return {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in sd.items()}


def _listify(obj):
    return [_listify(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _tuple(obj):
    return tuple(_tuple(o) for o in obj) if isinstance(obj, (tuple, list)) else obj
