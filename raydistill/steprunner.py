"""The production training step, in-process, behind a small public interface.

``StepRunner(cfg, workdir)`` sets a run up exactly as ``train`` does (``engine.Trainer.setup`` on a
``LocalSession`` in ``workdir``: data on the device, networks with the run's speed features, one
optimizer per trained network) and exposes only what measuring or replaying the step needs. It is
the one place outside the engine that reaches into a ``Trainer``: the benchmark
(``raydistill.bench``) and the reference steps (``benchmarks/reference``) use nothing else.

Set-up, as attributes:

* ``cfg``: the config; ``device``: where data and networks live; ``data``: the ``Dataset``, every
  split on ``device``; ``threads``: the intra-op threads set-up chose (``--threads``, else every
  CPU this process may use: a caller switching between runners restores it);
* ``specs``: ``{name: NetSpec}`` of the method's networks (architecture, trained or frozen).

Operations:

* ``batches()``: endless full training batches as the loop draws them (on the device, augmented,
  epoch after epoch);
* ``step(x, y)``: the production training step (``Trainer.train_step``: attack, losses, one
  backward, the optimizer steps) with the hyperparameters of epoch 0;
* ``context(epoch)``: a ``StepContext`` (threat model, hyperparameters at ``epoch``);
* ``update(loss)``: the step's ending for a loss computed elsewhere: gradients cleared, one
  backward, every optimizer steps;
* ``network(name)``: a network's bare module (no DDP wrapper), the one the attacks and the
  optimizer see; ``modules()``: ``(name, module)`` for every module that computes a network (its
  bare module and its fast-path views: BatchNorm-folded copy, compiled wrapper), for counting passes;
* ``eval_model()``: the student as evaluation runs it (the inference view of the selected student).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from . import fastpath
from .config import TrainConfig
from .methods import NetSpec, StepContext


class StepRunner:
    """One in-process run's training step (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, workdir: str | Path):
        from .engine import LocalSession, Trainer

        self._trainer = trainer = Trainer(cfg, LocalSession(str(workdir)))
        trainer.setup()
        self.cfg, self.device, self.data = cfg, trainer.device, trainer.data
        self.threads = torch.get_num_threads()  # set-up set it: the CPUs this run holds
        self.specs: dict[str, NetSpec] = dict(trainer.nets.specs)
        self._ctx = trainer.step_context(0)

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        from .data import iterate_batches

        d, t = self.data, self._trainer
        for epoch in itertools.count():
            yield from iterate_batches(d.train_x, d.train_y, t.per_worker_batch, shuffle=True, seed=self.cfg.seed,
                                       epoch=epoch, drop_last=True, augment=True, crop_pad=d.crop_pad,
                                       hflip=d.hflip, device=self.device)

    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return self._trainer.train_step(x, y, self._ctx)

    def context(self, epoch: float = 0.0) -> StepContext:
        return self._trainer.step_context(epoch)

    def update(self, loss: Tensor) -> None:
        optimizers = self._trainer.optimizers.values()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()

    def network(self, name: str) -> nn.Module:
        return self._trainer.nets._module(name)

    def modules(self) -> Iterator[tuple[str, nn.Module]]:
        for name in self.specs:
            net = self.network(name)
            for module in (net, *fastpath.views_of(net)):
                yield name, module

    def eval_model(self) -> nn.Module:
        return fastpath.inference_view(self.network(self._trainer.selected))
