"""Stein variational gradient descent (SVGD, Liu & Wang 2016) as an L-inf attack: n diverse
adversarial particles per input, as AT-AKA / CAT-AKA make them (Hamidi & Ye 2024, Eq. 2).

For every clean input x (each image of the batch has its own set of particles):

    x'_{i,0}   = Π(x + U(-eps, eps))                                  i = 1..n, independent starts
    x'_{i,t+1} = Π(x'_{i,t} + η · sign φ(x'_{i,t}))
    φ(x'_i)    = Σ_j [ k(x'_j, x'_i) ∇_{x'_j} L_j(x'_j)  +  (γ/n) ∇_{x'_j} k(x'_j, x'_i) ]
    k(a, b)    = exp(-||a - b||² / (2σ²)),     ∇_a k(a, b) = (b - a) / σ² · k(a, b)

Π projects onto the eps-ball around x intersected with [0, 1]. The first term of φ is a
kernel-weighted average of the particles' loss gradients (the "driving" force, ascent on L); the
second pushes particle i away from the particles near it (the repulsion that keeps them diverse).

How the paper's garbled Eq. 2 is read here, and why:

* Target. SVGD transports particles towards a density p; ascent on a loss L means p ∝ exp(L),
  so ∇ log p = ∇L. The printed formula misses the "+" between the two terms and writes the loss
  as L(f_{T_i}(x'_j), y): the updated particle's teacher i at every particle j. Read literally,
  that is n flows towards n different targets, coupled only by the repulsion, at n² forward and
  backward passes per iteration. Here each particle carries one loss, L_j(x'_j), given by the
  caller as ``objective(xs)`` -> (n, B): scored by its own network (n passes, as n PGD runs;
  identical to the literal reading wherever the kernel is local, k_ij ≈ 0 for i ≠ j), or by the
  ensemble's mean loss (textbook SVGD, one target density); see raydistill.methods.aka.
* Step. The update is the L-inf steepest-ascent step η · sign φ, the step of PGD: Remark 1 says
  that for a very wide kernel the update "reduces to FGSM (or equivalently PGD)", which holds for
  the sign step only, and the paper's η = 0.003 with 20 iterations (0.06 in total) reaches the
  8/255 ball only with a sign step: raw input gradients of a CE loss are ~1e-3 per pixel. With a
  sign step the overall scale of φ is irrelevant, so Liu & Wang's 1/n in front of the sum is
  dropped and γ = n gives their exact direction.
* Bandwidth. The paper's σ = 1e-3 cannot work on images: two uniform starts in the 8/255 ball of
  a 3x32x32 image are ||a - b||² ≈ 3072 · (2/3) · (8/255)² ≈ 2 apart, so k = exp(-1e6) = 0 for
  every pair but (i, i), where ∇k = 0: the repulsion vanishes and SVGD degenerates into n
  independent PGD runs from random starts. ``sigma=None`` (the default of the methods) uses Liu &
  Wang's median heuristic per input, 2σ² = med_{i≠j} ||x'_i - x'_j||² / log n (so k = 1/n at the
  median distance), recomputed every iteration and held constant in the gradient; a fixed σ
  (the paper's 1e-3 included) can be given instead: for AT-AKA / CAT-AKA, whose presets use the
  median, ``--set svgd_bandwidth=fixed`` is the paper-literal kernel (``svgd_sigma``, default 1e-3).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .attacks import start_point

ParticleObjective = Callable[[torch.Tensor], torch.Tensor]  # (n, B, ...) -> per-particle losses (n, B)


def svgd(objective: ParticleObjective, x: torch.Tensor, *, n: int, eps: float, step_size: float, steps: int,
         sigma: float | None = None, gamma: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """n SVGD particles per input that maximise ``objective``; returns them detached, shape (n, *x.shape).

    Every particle lies in the eps-ball around ``x`` and in [0, 1]. ``sigma=None``: median heuristic.
    """
    if n < 1 or eps < 0 or step_size < 0 or steps < 0:
        raise ValueError(f"need n >= 1 and eps, step_size, steps >= 0 (got {n}, {eps}, {step_size}, {steps})")
    x = x.detach()
    lower, upper = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    xs = x.expand(n, *x.shape)
    xs = torch.min(torch.max(start_point(xs, eps, "uniform", generator=generator), lower), upper)
    for _ in range(steps):
        xs.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(objective(xs).sum(), xs)
        xs = xs.detach()
        xs = torch.min(torch.max(xs + step_size * stein_direction(xs, grad, sigma, gamma).sign(), lower), upper)
    return xs


def stein_direction(xs: torch.Tensor, grad: torch.Tensor, sigma: float | None, gamma: float) -> torch.Tensor:
    """φ(x'_i) = Σ_j k_ij ∇L_j(x'_j) + (γ/n) Σ_j (x'_i - x'_j) k_ij / σ², per input; shape of ``xs``."""
    n = xs.shape[0]
    parts = xs.flatten(2).transpose(0, 1).float()  # (B, n, D): the particles of each input
    grads = grad.flatten(2).transpose(0, 1).float()
    sq_dist = torch.cdist(parts, parts).square()  # (B, n, n)
    two_sigma_sq = 2 * sigma ** 2 if sigma is not None else median_bandwidth(sq_dist)
    k = torch.exp(-sq_dist / two_sigma_sq)  # symmetric: k_ij = k(x'_j, x'_i)
    drive = k @ grads
    repulsion = (k.sum(dim=2, keepdim=True) * parts - k @ parts) * (2 / two_sigma_sq)
    phi = drive + (gamma / n) * repulsion
    return phi.transpose(0, 1).reshape(xs.shape).to(xs.dtype)


def median_bandwidth(sq_dist: torch.Tensor) -> torch.Tensor:
    """2σ² = median_{i≠j} ||x'_i - x'_j||² / log n per input (B, 1, 1); 1 when n = 1 (no pairs)."""
    b, n, _ = sq_dist.shape
    if n == 1:
        return torch.ones(b, 1, 1, device=sq_dist.device)
    off_diagonal = sq_dist[:, ~torch.eye(n, dtype=torch.bool, device=sq_dist.device)]
    return (off_diagonal.median(dim=1).values / math.log(n)).clamp_min(1e-12).view(b, 1, 1)


def pairwise_distance(xs: torch.Tensor, p: float = float("inf")) -> torch.Tensor:
    """Mean L-p distance over the pairs i < j of particles, per input; shape (B,). p = inf: AT-AKA Table 1's "dist"."""
    n = xs.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=xs.device)
    if len(i) == 0:
        return xs.new_zeros(xs.shape[1])
    return torch.linalg.vector_norm((xs[i] - xs[j]).flatten(2), ord=p, dim=2).mean(dim=0)
