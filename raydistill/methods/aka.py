"""AT-AKA and CAT-AKA: adversarial training via adaptive knowledge amalgamation of an ensemble
(Hamidi & Ye, 2024; Eq. 2-9). No public code exists: this follows the paper.

AT-AKA. n teachers T_1..T_n (``teacher0``..) and a student S, all trained from scratch. SVGD
(raydistill.svgd, Eq. 2) makes n diverse adversarial inputs x'_1..x'_n of each clean x; teacher
T_i learns CE(T_i(x'_i), y) on its own one; the student sees only the CLEAN x (Eq. 3):

    L_S = (1 - α) · CE(p^S(x), y) + α · ||z^S(x) - z^T||²,   z^T = ψ(z^{T_1}(x'_1), .., z^{T_n}(x'_n))

with the teachers' logits a constant target. ``mse_reduction``: ``mean`` (default) averages the
squared error over batch x classes, as PyTorch's MSELoss() and the name "MSE" do; ``batchmean``
sums it over classes as the printed ||.||² does (C times stronger: at α = 0.5 it made the student
collapse to chance on digits). Loss terms: ``teacher_ce`` (Σ_i of the teachers' CE), ``ce`` and
``mse`` (``kl`` for pareto). The amalgamation ψ weighs the teachers per sample by their losses ℓ_i = CE(p^{T_i}, y):

    naive  (Eq. 4)  z^T = z^{T_k},  k = argmax_i ℓ_i
    linear (Eq. 5)  z^T = Σ λ_i z^{T_i},  λ_i = ℓ_i / Σ_j ℓ_j
    soft   (Eq. 6)  z^T = Σ λ_i z^{T_i},  λ_i = softmax_i(β ℓ_i),  β = 1
    pareto (Eq. 7-8) λ* = argmin_{λ ∈ simplex} ||p^S - Σ λ_i p^{T_i}||²,  p^T = Σ λ*_i p^{T_i},
                    L_S = (1 - α) · CE(p^S, y) + α · KL(p^T || p^S)   (KL batch-mean, p^T the target)

CAT-AKA (Eq. 9). n students S_1..S_n (``student0``..) of equal size, each fed its own SVGD input,
supervise each other through the amalgamation of their own (detached) logits z^S = ψ(z^{S_i}):

    L = Σ_i (1 - α) · CE(p^{S_i}(x'_i), y) + α · ||z^{S_i}(x'_i) - z^S||²     (terms ``ce``, ``mse``)

The loop validates every student and keeps the most robust one. Pareto needs a distinct student
distribution p^S, which CAT-AKA has not: it offers naive, linear and soft, as the paper does.

SVGD particle losses (hparam ``svgd_target``): ``own`` scores particle j by CE of its own network,
L_j(x') = CE(T_j(x'), y) (n forward/backward passes per iteration, as n PGD runs); ``ensemble``
scores every particle by the ensemble's mean CE, L(x') = (1/n) Σ_i CE(T_i(x'), y): textbook SVGD
with one target density (n² passes). The attack runs the networks in ``bn_mode`` (eval by default).
``svgd_bandwidth`` = median (default, Liu & Wang's heuristic) or fixed (σ = ``svgd_sigma``, whose
default is the paper's 1e-3: ``--set svgd_bandwidth=fixed`` is the paper-literal kernel, which
vanishes on images, see raydistill.svgd). ``svgd_step`` 0 = the run's --step-size.

Presets (Appendix A; the quotes are beside them below and in tests/test_presets.py). AT-AKA on
CIFAR-10/100: 300 epochs, lr 0.1 divided by 10 at 200, 250 and 270, weight decay 2e-4. CAT-AKA on
CIFAR-10/100 (Table 4's setup): 120 epochs, divided by 10 at 75, 90 and 100; by the student's
architecture, ResNet-18 lr 0.01 and weight decay 3.5e-3 (preset ``cifar10/resnet18``), WRN-34-10
lr 0.1 and 7e-4 (``cifar10/wrn34_10``). Both: SVGD η = 0.003, 20 iterations, as printed, and the
median-heuristic bandwidth instead of the printed σ = 1e-3 (``svgd_bandwidth=fixed`` gives it).

Diagnostics (AT-AKA Table 1), per validation image: ``svgd_pairwise_linf`` / ``pgd_pairwise_linf``,
the mean pairwise L-inf distance of the n SVGD particles and of n PGD runs on the same particle
losses from independent uniform starts (same step and iterations, no kernel); ``*_pairwise_l2``
likewise in L2 (L-inf saturates at 2·eps as soon as one pixel sits on opposite faces of the ball);
``svgd_particle_loss`` / ``pgd_particle_loss``, their mean loss (attack strength).
"""
from __future__ import annotations

import itertools
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import attacks
from ..hparams import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, WEIGHT
from ..losses import REDUCTIONS, ce, kl_to_probs, reduce
from ..svgd import ParticleObjective, pairwise_distance, svgd
from .base import Method, NetSpec, attack_hparams

LOGIT_RULES = ("naive", "linear", "soft")
BANDWIDTHS = ("median", "fixed")  # svgd_bandwidth: the median heuristic, or the fixed σ = svgd_sigma
PAPER_SIGMA = 1e-3  # Appendix A: "Gaussian RBF kernel ... with σ = 1e − 3" (svgd_sigma's default)
# The SVGD of both methods' presets (AT-AKA Appendix A, Table 2's setup: "For SVGD method, we use Gaussian RBF kernel:
# k(x, x') = exp{-||x - x'||^2 / (2σ^2)} with σ = 1e − 3, and the number of particles/samples is the same as that of
# teachers. Also, η = 0.003, and the number of iterations is 20."): η and the iterations as printed; the bandwidth NOT
# as printed: the median heuristic, because σ = 1e-3 makes every kernel value between two particles exp(-1e6) = 0 and
# SVGD n independent PGD runs (raydistill.svgd). The paper-literal kernel is one switch away: --set svgd_bandwidth=fixed
# (σ = svgd_sigma, 1e-3 unless set).
SVGD = {"svgd_step": 0.003, "svgd_steps": 20, "svgd_bandwidth": "median"}
# AT-AKA, Appendix A, "Training setup for Table 2": "The networks are trained by stochastic gradient descent (SGD)
# optimizer using initial learning rate 0.1, momentum 0.9 and weight-decay 2e-4, and also we set the batch size equal to
# 128. We set the total number of training epochs to 300, and the learning rate is divided by 10 at the 200-th, 250-th
# and 270-th epoch."
CIFAR = {"epochs": 300, "lr": 0.1, "lr_milestones": [200, 250, 270], "weight_decay": 2e-4, "hp": SVGD}
# CAT-AKA, Appendix A, "Training setup for Table 4": "Both ResNet-18 and WideResNet-34-10 networks are trained via SGD
# optimizer of batch size equals 128 for 120 epochs. For ResNet-18, the initial learning rate is set to 0.01, momentum
# to 0.9, and weight decay to 3.5e-3. Also, for WRN-34-10, we set the initial learning rate to 0.1, momentum to 0.9, and
# weight decay to 7e-4. The learning rate is divided by 10 at the 75-th, 90-th and 100-th epochs. All the other
# settings, including those for SVGD and attacks, are the same as those we used for Table 2." The learning rate and
# weight decay depend on the student's architecture: presets "DATASET/resnet18" and "DATASET/wrn34_10" (another
# student gets the dataset's preset alone: lr and weight decay from the dataset's defaults).
CAT_CIFAR = {"epochs": 120, "lr_milestones": [75, 90, 100], "hp": SVGD}
CAT_ARCH = {"resnet18": {"lr": 0.01, "weight_decay": 3.5e-3}, "wrn34_10": {"lr": 0.1, "weight_decay": 7e-4}}


# ----------------------------------------------------------------------------- amalgamation ψ
def amalgamation_weights(losses: torch.Tensor, rule: str, beta: float = 1.0) -> torch.Tensor:
    """λ (n, B) from the per-network, per-sample losses ℓ (n, B): Eq. 4 (naive), 5 (linear), 6 (soft)."""
    if rule == "naive":
        return F.one_hot(losses.argmax(dim=0), losses.shape[0]).T.to(losses.dtype)
    if rule == "linear":  # losses floored at 1e-12: networks all at CE 0 (fp32 underflow) weigh equally
        losses = losses.clamp_min(1e-12)
        return losses / losses.sum(dim=0, keepdim=True)
    if rule == "soft":
        return torch.softmax(beta * losses, dim=0)
    raise ValueError(f"unknown amalgamation {rule!r}; choose from {', '.join(LOGIT_RULES)}")


def amalgamate(logits: torch.Tensor, y: torch.Tensor, rule: str, beta: float = 1.0) -> torch.Tensor:
    """z = ψ(z_1..z_n) = Σ_i λ_i z_i for logits (n, B, C), λ from each network's CE at the labels y."""
    logits = logits.detach().float()
    losses = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits])
    return (amalgamation_weights(losses, rule, beta).unsqueeze(2) * logits).sum(dim=0)


def pareto_weights(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """λ* = argmin_{λ ≥ 0, Σλ = 1} ||p_s - Σ_i λ_i p_t[i]||² per sample (Eq. 7); p_s (B, C), p_t (n, B, C) -> (n, B).

    Solved exactly, batched over the samples: the minimiser is the minimiser on the face of the
    simplex spanned by its support S, where the KKT conditions of the equality-constrained problem
    (G = P Pᵀ, b = P p_s, μ the multiplier of Σλ = 1) are the linear system

        [ 2 G_SS  1 ] [ λ_S ]   [ 2 b_S ]
        [ 1ᵀ      0 ] [  μ  ] = [   1   ]

    Every one of the 2^n - 1 supports is solved (pseudo-inverse: duplicate teachers make G singular)
    and the best solution with λ_S ≥ 0 is kept; n is the number of teachers (3 in the paper). For
    n = 2 this is the projection of p_s onto the segment [p_t[1], p_t[0]].
    """
    dtype, (n, batch) = p_t.dtype, p_t.shape[:2]
    p_s, p_t = p_s.detach().double(), p_t.detach().double()
    P = p_t.transpose(0, 1)  # (B, n, C)
    G, b = P @ P.transpose(1, 2), (P @ p_s.unsqueeze(2)).squeeze(2)
    best, best_f = p_s.new_zeros(batch, n), p_s.new_full((batch,), float("inf"))
    for k in range(1, n + 1):
        for support in itertools.combinations(range(n), k):
            idx = torch.tensor(support, device=p_s.device)
            kkt = p_s.new_ones(batch, k + 1, k + 1)
            kkt[:, :k, :k] = 2 * G[:, idx][:, :, idx]
            kkt[:, k, k] = 0
            rhs = torch.cat([2 * b[:, idx], p_s.new_ones(batch, 1)], dim=1).unsqueeze(2)
            lam_s = (torch.linalg.pinv(kkt) @ rhs)[:, :k, 0]
            lam = p_s.new_zeros(batch, n).index_copy(1, idx, lam_s)
            f = (p_s - (lam.unsqueeze(2) * P).sum(dim=1)).square().sum(dim=1)
            better = (lam_s >= -1e-9).all(dim=1) & (f < best_f)
            best, best_f = torch.where(better.unsqueeze(1), lam, best), torch.where(better, f, best_f)
    best = best.clamp_min(0)
    return (best / best.sum(dim=1, keepdim=True)).T.to(dtype)


def mse(z: torch.Tensor, target: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """L_MSE of Eq. 3 and 9: ||z - target||² summed over classes, averaged over the batch ("batchmean",
    the printed formula) or averaged over batch x classes ("mean", PyTorch's MSELoss(): C times smaller)."""
    return reduce((z.float() - target.float()).square().sum(dim=1), z.shape[1], reduction, None)


# ----------------------------------------------------------------------------- the methods
class AKAMethod(Method):
    """What AT-AKA and CAT-AKA share: n networks attacked together by SVGD, and Table 1's diagnostics."""

    members: ClassVar[str] = ""  # name prefix of the n networks that receive the SVGD inputs
    size: ClassVar[str] = ""  # the hyperparameter that holds n
    hparams = {"alpha": 0.5, "amalgamation": "soft", "beta": 1.0, "mse_reduction": "mean",
               "svgd_steps": 20, "svgd_step": 0.0, "svgd_gamma": 1.0, "svgd_bandwidth": "median",
               "svgd_sigma": PAPER_SIGMA, "svgd_target": "own", **attack_hparams(bn_mode="eval")}
    choices = {"amalgamation": LOGIT_RULES, "mse_reduction": REDUCTIONS, "svgd_bandwidth": BANDWIDTHS,
               "svgd_target": ("own", "ensemble")}
    # alpha: (1 - α) · CE + α · MSE; beta: soft ψ's inverse temperature (0: equal weights); svgd_step 0: --step-size
    ranges = {"alpha": FRACTION, "beta": NON_NEGATIVE, "svgd_steps": AT_LEAST_ONE, "svgd_step": NON_NEGATIVE,
              "svgd_gamma": WEIGHT, "svgd_sigma": POSITIVE}
    presets = {"cifar10": CIFAR, "cifar100": CIFAR}

    def names(self) -> list[str]:
        return [f"{self.members}{i}" for i in range(self.cfg.hp[self.size])]

    @staticmethod
    def particle_losses(models, y, target: str) -> ParticleObjective:
        """L_j(x'_j) for particles xs (n, B, ...): each scored by its own network, or by the ensemble mean."""
        if target == "own":
            return lambda xs: torch.stack([F.cross_entropy(m(x).float(), y, reduction="none")
                                           for m, x in zip(models, xs)])
        n = len(models)
        return lambda xs: torch.stack([F.cross_entropy(m(xs.flatten(0, 1)).float(), y.repeat(n), reduction="none")
                                       for m in models]).mean(dim=0).view(n, -1)

    @staticmethod
    def kernel_width(hp) -> float | None:
        """The SVGD kernel's σ: ``svgd_sigma`` (the paper's 1e-3 unless set) with ``svgd_bandwidth=fixed``, else
        None, the median heuristic (raydistill.svgd)."""
        return hp.svgd_sigma if hp.svgd_bandwidth == "fixed" else None

    def particles(self, nets, x, y, ctx, kernel: bool = True) -> torch.Tensor:
        """The n adversarial inputs (n, B, ...) by SVGD (``kernel=False``: n plain PGD runs, for comparison)."""
        hp = ctx.hp
        step = hp.svgd_step or ctx.step_size
        with self.attacking(nets, self.names(), hp.bn_mode) as models:
            objective = self.particle_losses(models, y, hp.svgd_target)
            if kernel:
                return svgd(objective, x, n=len(models), eps=ctx.eps, step_size=step, steps=hp.svgd_steps,
                            gamma=hp.svgd_gamma, sigma=self.kernel_width(hp))
            return attacks.pgd(objective, x.expand(len(models), *x.shape), eps=ctx.eps, step_size=step,
                               steps=hp.svgd_steps, random_start="uniform")

    def inner_max(self, nets, x, y, ctx):
        return {"x_particles": self.particles(nets, x, y, ctx)}

    def diagnostics(self, nets, x, y, ctx):
        out = {}
        for kind, kernel in (("svgd", True), ("pgd", False)):
            xs = self.particles(nets, x, y, ctx, kernel)
            with torch.no_grad(), self.attacking(nets, self.names(), "eval") as models:
                out[f"{kind}_particle_loss"] = self.particle_losses(models, y, ctx.hp.svgd_target)(xs).mean(dim=0)
            out[f"{kind}_pairwise_linf"] = pairwise_distance(xs)
            out[f"{kind}_pairwise_l2"] = pairwise_distance(xs, 2)
        return out


class ATAKA(AKAMethod):
    """AT-AKA: n teachers on their own SVGD inputs, the student on clean x with ψ of their logits."""

    name = "at_aka"
    members, size = "teacher", "n_teachers"
    hparams = {"n_teachers": 3, **AKAMethod.hparams}
    ranges = {"n_teachers": AT_LEAST_ONE, **AKAMethod.ranges}
    choices = {**AKAMethod.choices, "amalgamation": LOGIT_RULES + ("pareto",)}

    def networks(self):
        arch = self.cfg.peer or self.cfg.student
        return [NetSpec("student", self.cfg.student)] + [NetSpec(n, arch) for n in self.names()]

    def outer_min(self, nets, x, y, adv, ctx):
        hp = ctx.hp
        z_t = torch.stack([getattr(nets, n)(x_i) for n, x_i in zip(self.names(), adv["x_particles"])])
        z_s = nets.student(x)
        losses = {"teacher_ce": sum(ce(z, y) for z in z_t), "ce": (1 - hp.alpha) * ce(z_s, y)}
        if hp.amalgamation == "pareto":
            p_t = torch.softmax(z_t.detach().float(), dim=2)
            lam = pareto_weights(torch.softmax(z_s.detach().float(), dim=1), p_t)
            losses["kl"] = hp.alpha * kl_to_probs((lam.unsqueeze(2) * p_t).sum(dim=0), z_s)
        else:
            losses["mse"] = hp.alpha * mse(z_s, amalgamate(z_t, y, hp.amalgamation, hp.beta), hp.mse_reduction)
        return losses


class CATAKA(AKAMethod):
    """CAT-AKA: n equal students, each on its own SVGD input, taught by ψ of all their logits."""

    name = "cat_aka"
    members, size = "student", "n_students"
    hparams = {"n_students": 3, **AKAMethod.hparams}
    ranges = {"n_students": AT_LEAST_ONE, **AKAMethod.ranges}
    presets = {**{d: CAT_CIFAR for d in ("cifar10", "cifar100")},  # Table 4 covers CIFAR-10 and CIFAR-100
               **{f"{d}/{arch}": v for d in ("cifar10", "cifar100") for arch, v in CAT_ARCH.items()}}

    def networks(self):
        return [NetSpec(n, self.cfg.student) for n in self.names()]

    def outer_min(self, nets, x, y, adv, ctx):
        hp = ctx.hp
        z = [getattr(nets, n)(x_i) for n, x_i in zip(self.names(), adv["x_particles"])]
        z_s = amalgamate(torch.stack(z), y, hp.amalgamation, hp.beta)
        return {"ce": (1 - hp.alpha) * sum(ce(z_i, y) for z_i in z),
                "mse": hp.alpha * sum(mse(z_i, z_s, hp.mse_reduction) for z_i in z)}
