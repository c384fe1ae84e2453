"""The plain loop: the limit the production loop's throughput is measured against (``bench --ray-overhead
--plain-loop``).

A single-process PyTorch loop written out by hand over the same tensors as the production run (the dataset as
``load_dataset`` gives it: the same validation holdout and ``--train-size`` subset, in memory as the loader
returns it), with the same network, initial seed, optimiser (SGD with the run's lr, momentum and weight decay),
batch size, intra-op threads and passes per batch:

* ``natural``: forward, cross-entropy, backward, SGD step (1 forward, 1 backward);
* ``pgd_at``: PGD on the cross-entropy with the network in eval() mode, from a uniform start in the eps-ball,
  ``attack_steps`` signed-gradient steps of ``step_size`` projected onto the ball and [0, 1]; then the natural
  step on the adversarial batch in train() mode (attack_steps + 1 forwards and backwards: the production
  step's passes).

Nothing else: a plain ``randperm`` order, no sharding, augmentation, loss sums, hooks, metrics, validation or
checkpoints. Datasets the production loop augments (random crops or flips: CIFAR, digits) are not like for like;
MNIST and Fashion-MNIST are not augmented. Each epoch's time covers the batches only, as the production loop's
``train/epoch_time_s`` does.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..config import TrainConfig

METHODS = ("natural", "pgd_at")  # the methods with a plain form here


def _pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    lower, upper = (x - cfg.eps).clamp(0, 1), (x + cfg.eps).clamp(0, 1)
    x_adv = torch.min(torch.max(x + torch.empty_like(x).uniform_(-cfg.eps, cfg.eps), lower), upper)
    model.eval()
    for _ in range(cfg.attack_steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + cfg.step_size * grad.sign(), lower), upper)
    model.train()
    return x_adv.detach()


def plain_epoch_times(config: dict) -> tuple[list[float], float]:
    """Run the plain loop of ``config`` (a ``TrainConfig.to_dict()``) for its epochs, in this process: each
    epoch's time (s) and the wall time from the start (set-up included), like ``overhead._epoch_times``."""
    from ..data import load_dataset
    from ..models import build_model
    from ..sessions import usable_cpus

    cfg = TrainConfig.from_dict(config)
    if cfg.method not in METHODS:
        raise ValueError(f"the plain loop has {', '.join(METHODS)}, not {cfg.method}")
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.placement.threads or usable_cpus())  # as the in-process run: every CPU it may use
    torch.manual_seed(cfg.seed)
    d = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, val_size=cfg.val_size,
                     train_size=cfg.train_size, **cfg.dataset_options)
    model = build_model(cfg.student, d.num_classes, d.in_shape).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n, times = len(d.train_y), []
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x, y = d.train_x[idx], d.train_y[idx]
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
            if cfg.method == "pgd_at":
                x = _pgd(model, x, y, cfg)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return times, time.perf_counter() - t0
