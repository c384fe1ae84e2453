"""Hooks for the training loop (raydistill.engine.Hooks) that the end-to-end tests put into real runs.

They reach Ray workers pickled in TorchTrainer's train_loop_config; the workers import this module
by name (conftest.train_with_hooks puts tests/ on the run's PYTHONPATH)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path


class KillOnce:
    """The worker of ``rank`` SIGKILLs itself once (the ``marker`` file records it) in epoch ``epoch``
    (0-based): ``when="mid_epoch"`` halfway through the epoch's batches, ``"after_report"`` right after
    the epoch's checkpoint is reported (before Ray's controller can register it)."""

    def __init__(self, when: str, epoch: int, rank: int, marker: str | os.PathLike):
        if when not in ("mid_epoch", "after_report"):
            raise ValueError(f"when={when!r}: mid_epoch or after_report")
        self.when, self.epoch, self.rank, self.marker = when, epoch, rank, str(marker)

    def on_batch(self, trainer, epoch: int, index: int, n_batches: int) -> None:
        if self.when == "mid_epoch" and index == n_batches // 2:
            self._kill(trainer, epoch)

    def after_report(self, trainer, epoch: int) -> None:
        if self.when == "after_report":
            self._kill(trainer, epoch)

    def _kill(self, trainer, epoch: int) -> None:
        if epoch == self.epoch and trainer.s.rank == self.rank and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for k, v in tensors:
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class WeightDigests:
    """At the end of the run each rank writes ``folder/rank<R>.json``: a digest of every trained network's
    parameters (``NAME``) and buffers (``NAME.buffers``), the type of each network's training wrapper
    (``ddp``), the worker's GIL switch interval and its niceness."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = str(folder)

    def on_end(self, trainer) -> None:
        digests = {}
        for n in trainer.trainable:
            digests[n] = digest(trainer.modules[n].named_parameters())
            digests[f"{n}.buffers"] = digest(trainer.modules[n].named_buffers())
        digests["ddp"] = {n: type(getattr(trainer.nets, n)).__name__ for n in trainer.trainable}
        digests["switch_interval_s"] = sys.getswitchinterval()
        digests["nice"] = os.nice(0)
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        Path(self.folder, f"rank{trainer.s.rank}.json").write_text(json.dumps(digests))


class NodeIds:
    """At the end of the run each rank writes ``folder/rank<R>.node``: the id of the Ray node it ran on."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = str(folder)

    def on_end(self, trainer) -> None:
        import ray

        Path(self.folder).mkdir(parents=True, exist_ok=True)
        Path(self.folder, f"rank{trainer.s.rank}.node").write_text(ray.get_runtime_context().get_node_id())


class PauseOnce:
    """Every rank pauses once at batch ``index`` of epoch ``epoch`` (0-based): it writes ``folder/rank<R>``
    (its world size inside) and waits until ``folder/go`` exists (``timeout`` seconds at most), so that a
    test can lose a node while every rank is mid-epoch. A rank whose file exists does not pause again (a
    restarted group passes through)."""

    def __init__(self, folder: str | os.PathLike, epoch: int, index: int = 2, timeout: float = 300.0):
        self.folder, self.epoch, self.index, self.timeout = str(folder), epoch, index, timeout

    def on_batch(self, trainer, epoch: int, index: int, n_batches: int) -> None:
        import time

        mine = Path(self.folder, f"rank{trainer.s.rank}")
        if epoch != self.epoch or index != min(self.index, n_batches - 1) or mine.exists():
            return
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        mine.write_text(str(trainer.s.world_size))
        deadline = time.monotonic() + self.timeout
        while not Path(self.folder, "go").exists() and time.monotonic() < deadline:
            time.sleep(0.2)


class HoldWhileFewer:
    """Rank 0 of a group of fewer than ``workers`` workers holds at the first batch of epoch ``epoch`` (0-based),
    ``timeout`` seconds at most, so that an elastic run's controller can grow the group back meanwhile (it
    restarts the group from the last checkpoint: the held epoch is then trained by the larger group)."""

    def __init__(self, epoch: int, workers: int, timeout: float = 240.0):
        self.epoch, self.workers, self.timeout = epoch, workers, timeout

    def on_batch(self, trainer, epoch: int, index: int, n_batches: int) -> None:
        import time

        if epoch == self.epoch and index == 0 and trainer.s.rank == 0 and trainer.s.world_size < self.workers:
            time.sleep(self.timeout)
