"""The one training loop, run as Ray Train TorchTrainer's per-worker function or in-process.

Per epoch: every trained network steps once per batch (one backward over the sum of the method's
loss terms, one SGD optimizer per network with the piecewise learning-rate decay), the student's
weights are averaged (SWA) from ``swa_start`` with a BatchNorm refresh, the student (and its
average) is validated on clean and PGD-10 inputs, the method's diagnostics are averaged, the best
student by the method's ``selection`` (PGD-10; natural: clean) is kept, a checkpoint is written and
reported, and rank 0 logs to MLflow. After the last epoch the best checkpoint is evaluated on the test split.

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
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

from . import fastpath, plugins, provenance
from .checkpoint import TrainingState, load_model
from .config import TrainConfig
from .data import iterate_batches, load_dataset
from .errors import not_a_usage_error
from .methods import HP, Nets, StepContext, get_method
from .models import build_model
from .schedules import lr_at
from .sessions import LocalSession, RaySession, all_reduce_sum, note_worker_niceness

__all__ = ["HOOK_POINTS", "Hooks", "LocalSession", "NonFiniteLoss", "RaySession", "Trainer", "WORKER_SWITCH_INTERVAL_S",
           "lr_at", "run_in_process", "train_worker"]
WORKER_SWITCH_INTERVAL_S = 0.05  # the GIL switch interval in Ray Train workers (see train_worker)
LABELS = {"pgd10": "PGD-10", "clean": "clean"}  # Method.selection, as the messages name it


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite: the run stops with this reason."""


# ============================================================================= hooks
HOOK_POINTS = ("on_batch", "after_report", "on_end")


class Hooks:
    """The loop's hooks: objects with any of the methods below, called in order at fixed points (tests
    use them to kill a worker or to inspect the trained weights; they travel to Ray workers pickled):

    * ``on_batch(trainer, epoch, index, n_batches)``: before each training step of this rank;
    * ``after_report(trainer, epoch)``: after the epoch's checkpoint is reported, before MLflow logs it;
    * ``on_end(trainer)``: after the run, on every rank.
    """

    def __init__(self, hooks=()):
        hooks = list(hooks)
        for h in hooks:
            if not any(callable(getattr(h, p, None)) for p in HOOK_POINTS):
                raise TypeError(f"{h!r} is not a hook: it has none of the methods {', '.join(HOOK_POINTS)}")
        self._at = {p: [getattr(h, p) for h in hooks if callable(getattr(h, p, None))] for p in HOOK_POINTS}

    def __call__(self, point: str, *args) -> None:
        for fn in self._at[point]:
            fn(*args)


def train_worker(config: dict) -> None:
    """TorchTrainer's ``train_loop_per_worker``: ``config`` is ``{"config": TrainConfig, "hooks": [...]}``."""
    import logging

    # our own progress line says enough; some Ray Train modules name their logger by file path
    # ("Reporting training result ..." at INFO, once per epoch and rank); bad input, one line from the driver
    by_path = os.path.join("ray", "train", "")
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("ray.train") or by_path in n] + ["ray.train"]:
        logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger(name).addFilter(not_a_usage_error)
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
        plugins.load_environment()  # the plugins the driver shipped (RAYDISTILL_PLUGINS), before a name is looked up
        Trainer(config["config"], RaySession(), hooks=config.get("hooks", ())).run()
    finally:
        sys.setswitchinterval(previous)


# ============================================================================= the loop
class Trainer:
    """The loop on one rank: ``session`` says where it runs (raydistill.sessions), ``hooks`` what else
    runs at its fixed points (``Hooks``)."""

    def __init__(self, cfg: TrainConfig, session, hooks=()):
        self.cfg, self.s = cfg, session
        self.is_main = session.rank == 0
        self.hooks = Hooks(hooks)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg, s = self.cfg, self.s
        torch.set_num_threads(cfg.placement.threads or s.cpus)  # exactly the CPUs this worker holds: no oversubscription
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.device = s.device
        fastpath.configure_backends(self.device, cfg.precision)  # the precision policy (fastpath's docstring)
        self.data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                                 val_size=cfg.val_size, train_size=cfg.train_size, **cfg.dataset_options)
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
        self.modules = {n: raw[n] for n in self.trainable}  # every trained network, bare
        self.optimizers = {n: torch.optim.SGD(raw[n].parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                              weight_decay=cfg.weight_decay) for n in self.trainable}
        self.swa = (torch.optim.swa_utils.AveragedModel(raw["student"])
                    if cfg.swa_start is not None and "student" in raw else None)
        self.state = TrainingState(self.modules, self.optimizers, self.swa, student=self.selected, device=self.device,
                                   selection=self.method.selection)  # "pgd10" | "clean": picks the best checkpoint
        self.restore(s.load_checkpoint())
        self.per_worker_batch = max(1, cfg.batch_size // s.world_size)
        self.logger = None
        if self.is_main and cfg.placement.mlflow_run_id:
            from .tracking import EpochLogger

            self.logger = EpochLogger(cfg.placement.tracking_uri, cfg.placement.mlflow_run_id)
            self.logger.backfill(self.state.history)

    def restore(self, state: dict | None) -> None:
        if state is None:
            return
        self.state.load_state_dict(state)
        best = self.state.best
        self.selected = best.get("student", self.selected)
        if self.is_main:
            print(f"[raydistill] resumed from epoch {self.start_epoch} (best {LABELS[best['by']]} {best['score']:.4f} at epoch {best['epoch']})", flush=True)

    @property
    def start_epoch(self) -> int:
        """The first epoch this run trains (the epochs its checkpoint holds)."""
        return self.state.epoch

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
            self.hooks("on_batch", self, epoch, i, n_batches)
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
        out["train/workers"] = float(self.s.world_size)  # changes in an elastic run (--workers MIN-MAX)
        return out

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """One optimisation step of every trained network: the method's inner maximisation and
        outer minimisation (under bf16 autocast on the fast path), one backward over the summed
        loss terms, one SGD step per network. Returns the (graph-holding) loss terms.

        Nothing in it waits for the device (no ``.item()``, ``float(tensor)``, host copies): the
        epoch's sums stay tensors until the epoch ends (tests/test_cuda_paths.py)."""
        with fastpath.autocast(self.device, self.cfg.precision):
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

    # ------------------------------------------------------------------ evaluation
    def shard(self, x: torch.Tensor, y: torch.Tensor):
        return x[self.s.rank::self.s.world_size], y[self.s.rank::self.s.world_size]

    def robust_eval(self, model: nn.Module, x, y, attacks: list[str], prefix: str) -> dict[str, float]:
        """Accuracy under ``attacks`` (on the test split also the per-image worst case) of the chunks this rank
        attacks (evaluation.rank_counts: the figures do not depend on the worker count), summed over ranks."""
        from .evaluation import rank_counts

        # strict fp32 (no autocast, TF32 off) whatever --precision says; a folded copy (--fold-bn) is the same function
        with fastpath.strict_fp32():
            keys, counts = rank_counts(fastpath.inference_view(model), x, y, attacks, rank=self.s.rank,
                                       world_size=self.s.world_size, batch_size=max(256, self.cfg.batch_size),
                                       eps=self.cfg.eps, step_size=self.cfg.step_size, device=self.device,
                                       worst=prefix.startswith("test/"))
        tot = all_reduce_sum(counts, self.device)
        return {f"{prefix}{k}": v / max(1.0, tot[-1]) for k, v in zip(keys, tot)}

    def validate(self) -> dict[str, float]:
        with fastpath.strict_fp32():  # validation and its diagnostics: strict fp32 whatever --precision says
            return self._validate()

    def _validate(self) -> dict[str, float]:
        d = self.data
        if len(self.students) == 1:
            out = self.robust_eval(self.nets._module(self.selected), d.val_x, d.val_y, ["clean", "pgd10"], "val/")
        else:  # every student reported; the best by the selection (the most robust) is selected
            out = {}
            for n in self.students:
                out.update(self.robust_eval(self.nets._module(n), d.val_x, d.val_y, ["clean", "pgd10"], f"val/{n}_"))
            self.selected = max(self.students, key=lambda n: out[f"val/{n}_{self.state.selection}_acc"])
            out["val/clean_acc"] = out[f"val/{self.selected}_clean_acc"]
            out["val/pgd10_acc"] = out[f"val/{self.selected}_pgd10_acc"]
            out["val/selected_student"] = float(self.students.index(self.selected))
        if self.swa is not None and self.swa.n_averaged.item() > 0:
            out.update(self.robust_eval(self.swa.module, d.val_x, d.val_y, ["clean", "pgd10"], "val/swa_"))
        out.update(self.diagnostics())
        return out

    def diagnostics(self) -> dict[str, float]:
        ctx = self.step_context(len(self.state.history))
        xs, ys = self.shard(self.data.val_x, self.data.val_y)
        sums: dict[str, torch.Tensor] = {}  # on the device: no wait per batch
        modes = {n: self.nets._module(n).training for n in self.nets.names()}
        for n in self.nets.names():
            self.nets._module(n).eval()
        for x, y in iterate_batches(xs, ys, max(256, self.per_worker_batch), shuffle=False, seed=0, epoch=0,
                                    device=self.device):
            for k, v in self.method.diagnostics(self.nets, x, y, ctx).items():
                sums[k] = sums.get(k, 0.0) + v.float().sum().double()  # fp32 batch sums added in fp64, as before
        for n, was in modes.items():
            self.nets._module(n).train(was)
        names = sorted(sums)
        if not names:
            return {}
        tot = all_reduce_sum([float(sums[k]) for k in names] + [float(len(ys))], self.device)
        return {f"val/{k}": v / max(1.0, tot[-1]) for k, v in zip(names, tot)}

    def refresh_bn(self, model: nn.Module, epoch: int) -> None:
        """Recompute BatchNorm statistics of the averaged model over this rank's augmented training
        batches (a cumulative average: update_bn sets each BatchNorm's momentum to None meanwhile)."""
        d = self.data
        batches = iterate_batches(d.train_x, d.train_y, self.per_worker_batch, shuffle=True, seed=self.cfg.seed + 7919,
                                  epoch=epoch, rank=self.s.rank, world_size=self.s.world_size, augment=True,
                                  crop_pad=d.crop_pad, hflip=d.hflip, device=self.device)
        torch.optim.swa_utils.update_bn(batches, model)

    # ------------------------------------------------------------------ checkpoints
    def meta(self) -> dict:
        cfg, classes = self.cfg, self.data.classes  # the class names of folder:/npz: data (else None)
        return {"method": cfg.method, "dataset": cfg.dataset, "classes": classes, "data_dir": cfg.data_dir, "eps": cfg.eps,
                "step_size": cfg.step_size, "seed": cfg.seed, "name": cfg.placement.name, "student": self.state.best["student"],
                "plugins": provenance.used_by(cfg)}

    def write_checkpoint(self, directory: str) -> None:
        d = self.data
        self.state.save(directory, config=self.cfg.to_dict(), student=self.selected, arch=self.cfg.student,
                        num_classes=d.num_classes, in_shape=d.in_shape, meta=self.meta())

    # ------------------------------------------------------------------ run
    def run(self) -> None:
        self.setup()
        cfg, first = self.cfg, self.start_epoch
        for epoch in range(first, cfg.epochs):
            metrics = self.train_epoch(epoch)
            self.sync_buffers()
            if self.swa is not None and epoch >= cfg.swa_start:
                self.swa.update_parameters(self.nets._module("student"))
                self.refresh_bn(self.swa.module, epoch)
            metrics.update(self.validate())
            # the best checkpoint by the selection: the student or its weight average (val/best_acc: by the selection)
            state, accs = self.state, lambda pre: {k: metrics[f"{pre}{k}_acc"] for k in ("clean", "pgd10")}
            state.consider_best(accs("val/"), epoch, self.selected, self.modules[self.selected], False)
            if "val/swa_pgd10_acc" in metrics:
                state.consider_best(accs("val/swa_"), epoch, "student", self.swa.module, True)
            metrics.update({"epoch": epoch + 1, "epochs_completed": epoch + 1, "val/best_acc": state.best["score"],
                            **{f"val/best_{k}_acc": state.best[k] for k in ("clean", "pgd10")}})
            state.history.append(metrics)
            state.epoch = epoch + 1
            if self.is_main:
                print(progress_line(epoch, cfg.epochs, metrics), flush=True)
            # the last epoch's report carries the test figures (Ray returns the last checkpointed metrics)
            self.report(dict(metrics, **self.test()) if epoch == cfg.epochs - 1 else metrics)
            self.hooks("after_report", self, epoch)
            if self.logger:
                self.logger.log_epoch(epoch, metrics)
        if first >= cfg.epochs:  # relaunched after completion: just the test figures again
            self.report(dict(self.state.history[-1], **self.test()), repeated=True)
        self.hooks("on_end", self)

    def report(self, metrics: dict, repeated: bool = False) -> None:
        """Checkpoint (rank 0 writes it) and report; the test figures, if present, go to MLflow."""
        with tempfile.TemporaryDirectory(prefix="raydistill-ckpt-") as tmp:
            if self.is_main:
                self.write_checkpoint(tmp)
            self.s.report(metrics, tmp if self.is_main else None, repeated)
        if self.logger and any(k.startswith("test/") for k in metrics):
            self.logger.log_final(metrics)

    def test(self) -> dict[str, float]:
        """Test-split figures of the best student by the selection (and of the averaged student), in strict fp32."""
        with fastpath.strict_fp32():
            return self._test()

    def _test(self) -> dict[str, float]:
        cfg, d, best = self.cfg, self.data, self.state.best
        model = copy.deepcopy(self.nets._module(best["student"]))
        if best["state_dict"] is not None:
            model.load_state_dict(best["state_dict"])
        model.eval()
        out = {"best_epoch": best["epoch"] + 1, "best_is_averaged": float(best.get("averaged", False))}
        out.update(self.robust_eval(model, d.test_x, d.test_y, list(cfg.test_attacks), "test/"))
        if self.swa is not None and self.swa.n_averaged.item() > 0:
            out.update(self.robust_eval(self.swa.module, d.test_x, d.test_y, list(cfg.test_attacks), "test/swa_"))
        if self.is_main:
            which = "weight-averaged student" if best.get("averaged") else "student"
            print("[raydistill] test (best %s checkpoint: %s, epoch %d): %s" % (LABELS[self.state.selection], which, out["best_epoch"], "  ".join(
                f"{k[5:]} {v:.4f}" for k, v in out.items() if k.startswith("test/"))), flush=True)
        return out


def progress_line(epoch: int, epochs: int, m: dict) -> str:
    losses = " ".join(f"{k[len('train/loss_'):]}={v:.4f}" for k, v in m.items() if k.startswith("train/loss_"))
    vals = " ".join(f"{k[4:]}={v:.3f}" for k, v in m.items() if k.startswith("val/") and not k.startswith("val/best_"))
    n = int(m.get("train/workers", 1))
    return (f"[raydistill] epoch {epoch + 1}/{epochs} | loss {losses} | {vals} | "
            f"{m['train/images_per_s']:.0f} img/s on {n} worker{'s' if n > 1 else ''} | {m['train/epoch_time_s']:.1f}s")


def run_in_process(cfg: TrainConfig, hooks=()) -> LocalSession:
    session = LocalSession(cfg.placement.run_dir(), cfg.placement.cpus_per_worker)
    Trainer(cfg, session, hooks).run()
    return session

