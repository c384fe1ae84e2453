"""Where the loop runs: in-process (LocalSession) or in a Ray Train worker (RaySession).

A session gives the loop its rank, world size, device and CPUs, wraps a network for data-parallel
training, finds the checkpoint to resume from and persists each epoch's checkpoint folder
(``checkpoint_NNNNNN``, NNNNNN = epochs completed; its files: raydistill.checkpoint).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import STATE_FILE, read_state
from .storage import CHECKPOINT_DIR, KEEP_CHECKPOINTS


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def checkpoint_name(epochs_completed: int) -> str:
    return f"checkpoint_{epochs_completed:06d}"


def _checkpoint_epoch(path: str) -> int:
    """N of a folder named ``checkpoint_NNNNNN`` (the epochs it holds), else -1."""
    m = CHECKPOINT_DIR.fullmatch(str(path).rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


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
        return read_state(path)

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
            for old in sorted(self.run_dir.glob("checkpoint_*"))[:-KEEP_CHECKPOINTS]:
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
            return read_state(d)

    def report(self, metrics: dict, checkpoint_dir: str | None, repeated: bool = False) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # named by epoch (on every rank: Ray checks that the names agree) so that load_checkpoint finds
        # it; a finished run's epoch reported again gets Ray's default name: a folder Ray registered
        # once is never written twice (Ray deletes old checkpoints by folder)
        name = None if repeated else checkpoint_name(int(metrics["epochs_completed"]))
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


def note_worker_niceness() -> None:
    """Rank 0 of a CPU run says so when Ray runs it niced (its worker_niceness, 15 unless the cluster was
    started with RAY_worker_niceness=0 as train.init_ray and clusters/ do)."""
    import ray.train

    nice = os.nice(0)
    if nice > 0 and not torch.cuda.is_available() and ray.train.get_context().get_world_rank() == 0:
        print(f"[raydistill] note: Ray runs this worker at nice {nice}, below its own daemons; on a CPU node "
              "that costs speed: start Ray with RAY_worker_niceness=0 in the environment of `ray start`", flush=True)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The sum of ``values`` over every rank (as they are with one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
