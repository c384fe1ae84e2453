"""Attacks: ONE L-infinity projected-gradient-ascent routine for training and evaluation, and CW_2 (L2).

Inputs are images in [0, 1] (no normalisation); ``eps`` and ``step_size`` are in that pixel scale.

* :func:`pgd` maximises any ``objective(x_adv)`` (a scalar or per-sample losses) inside the
  eps-ball intersected with [0, 1]. Gradients are taken with ``torch.autograd.grad`` with respect
  to the input only, so no parameter ``.grad`` is ever written.
* Objective builders return per-sample losses: :func:`ce_loss`, :func:`kl_loss` (towards a fixed
  target distribution), :func:`kl_between` (teacher vs student, gradient through both: AdaAD's
  inner maximisation) and :func:`cw_loss` (the CW margin). Logits are cast to fp32, so a caller's
  bf16 autocast does not weaken the attack loss.
* Evaluation attacks (:func:`pgd_attack`, :func:`fgsm`, :func:`cw_linf`, :func:`autoattack`) run
  the model in eval mode for their duration (see :func:`bn_mode`) and restore its state; so does
  :func:`cw_l2` (CW_2), the one L2 attack: Adam in tanh space, not PGD.

Random starts follow the authors' code: ``"normal"`` is ``x + 0.001 * N(0, 1)`` (PeerAiD, AdaAD,
RSLAD, TRADES), ``"uniform"`` is ``x + U(-eps, eps)`` (ARD, IAD and every evaluation attack).
With a DDP-wrapped model, attack ``model.module`` inside the training step.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

Objective = Callable[[torch.Tensor], torch.Tensor]
RANDOM_STARTS = ("uniform", "normal", "none")
BN_MODES = ("eval", "train", "keep")
PGD_LOSSES = ("ce", "cw")


# ----------------------------------------------------------------------------- the PGD core
def start_point(x: torch.Tensor, eps: float, kind: str = "uniform", normal_std: float = 0.001,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The starting point of PGD (not yet projected): x, x + U(-eps, eps) or x + normal_std * N(0, 1)."""
    if kind == "none":
        return x.clone()
    if kind == "uniform":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + (2 * noise - 1) * eps
    if kind == "normal":
        return x + normal_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    raise ValueError(f"unknown random start {kind!r}; choose from {', '.join(RANDOM_STARTS)}")


def pgd(objective: Objective, x: torch.Tensor, *, eps: float, step_size: float, steps: int,
        random_start: str = "uniform", normal_std: float = 0.001,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD that maximises ``objective(x_adv)`` (summed when it returns per-sample losses).

    Each step is ``x_adv = clamp(min(max(x_adv + step_size * sign(g), x - eps), x + eps), 0, 1)``.
    The result is detached and lies in the eps-ball around ``x`` and in [0, 1]; ``eps = 0`` gives ``x``.
    The model's mode is left alone (wrap the call in :func:`bn_mode` to choose it).
    """
    if eps < 0 or step_size < 0 or steps < 0:
        raise ValueError(f"eps, step_size and steps must be >= 0 (got {eps}, {step_size}, {steps})")
    x = x.detach()
    lower, upper = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    x_adv = torch.min(torch.max(start_point(x, eps, random_start, normal_std, generator), lower), upper)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = objective(x_adv)
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), lower), upper)
    return x_adv.detach()


# ----------------------------------------------------------------------------- objectives
def ce_loss(model: nn.Module, y: torch.Tensor) -> Objective:
    """Per-sample cross-entropy of ``model`` at the true labels ``y``."""
    return lambda x: F.cross_entropy(model(x).float(), y, reduction="none")


def kl_loss(model: nn.Module, target_probs: torch.Tensor, tau: float = 1.0) -> Objective:
    """Per-sample KL(target || softmax(model(x) / tau)) with the target distribution held fixed."""
    p = target_probs.detach().float()
    entropy_term = torch.xlogy(p, p).sum(dim=1)
    return lambda x: entropy_term - (p * F.log_softmax(model(x).float() / tau, dim=1)).sum(dim=1)


def kl_between(teacher: nn.Module, student: nn.Module, tau: float = 1.0) -> Objective:
    """Per-sample KL(softmax(T(x)/tau) || softmax(S(x)/tau)); the gradient flows through both models."""

    def objective(x: torch.Tensor) -> torch.Tensor:
        log_t = F.log_softmax(teacher(x).float() / tau, dim=1)
        log_s = F.log_softmax(student(x).float() / tau, dim=1)
        return (log_t.exp() * (log_t - log_s)).sum(dim=1)

    return objective


def cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    """Per-sample CW loss ``-max(z_y - max_{j != y} z_j + kappa, 0)`` (maximising it drives z_y below the rest)."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return -(true - other + kappa).clamp(min=0)


def cw_loss(model: nn.Module, y: torch.Tensor, kappa: float = 50.0) -> Objective:
    """Per-sample CW margin loss of ``model`` (see :func:`cw_margin`)."""
    return lambda x: cw_margin(model(x), y, kappa)


# ----------------------------------------------------------------------------- modes
@contextlib.contextmanager
def bn_mode(modules: nn.Module | Iterable[nn.Module], mode: str) -> Iterator[None]:
    """Put ``modules`` in ``"eval"`` or ``"train"`` mode (or ``"keep"`` them) and restore every submodule after."""
    if mode not in BN_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(BN_MODES)}")
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    saved = [(m, m.training) for top in modules for m in top.modules()]
    try:
        if mode != "keep":
            for m in modules:
                m.train(mode == "train")
        yield
    finally:
        for m, training in saved:
            m.training = training


@contextlib.contextmanager
def frozen_params(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of the model's parameters for the duration (for code that calls backward())."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ----------------------------------------------------------------------------- evaluation attacks
def _objective(model: nn.Module, y: torch.Tensor, loss: str, kappa: float) -> Objective:
    if loss == "ce":
        return ce_loss(model, y)
    if loss == "cw":
        return cw_loss(model, y, kappa)
    raise ValueError(f"unknown PGD loss {loss!r}; choose from {', '.join(PGD_LOSSES)}")


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1) == y


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
               restarts: int = 1, random_start: str = "uniform", loss: str = "ce", kappa: float = 50.0,
               generator: torch.Generator | None = None, mode: str = "eval") -> torch.Tensor:
    """Evaluation PGD on ``loss`` ("ce" or "cw"); with restarts, keep per sample the first example that fools.

    Later restarts only attack the samples still classified correctly.
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    with bn_mode(model, mode):
        x_adv = pgd(_objective(model, y, loss, kappa), x, eps=eps, step_size=step_size, steps=steps,
                    random_start=random_start, generator=generator)
        if restarts == 1:
            return x_adv
        robust = _correct(model, x_adv, y)
        for _ in range(restarts - 1):
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            cand = pgd(_objective(model, y[idx], loss, kappa), x[idx], eps=eps, step_size=step_size,
                       steps=steps, random_start=random_start, generator=generator)
            fooled = ~_correct(model, cand, y[idx])
            x_adv[idx[fooled]] = cand[fooled]
            robust[idx[fooled]] = False
    return x_adv


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, mode: str = "eval") -> torch.Tensor:
    """FGSM: one signed-gradient step of size eps on the cross-entropy from x (no random start)."""
    return pgd_attack(model, x, y, eps=eps, step_size=eps, steps=1, random_start="none", mode=mode)


def cw_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int = 30,
            kappa: float = 50.0, generator: torch.Generator | None = None, mode: str = "eval") -> torch.Tensor:
    """CW-inf: PGD on the CW margin loss (30 steps, kappa 50 in the papers' protocol), uniform start."""
    return pgd_attack(model, x, y, eps=eps, step_size=step_size, steps=steps, loss="cw", kappa=kappa,
                      generator=generator, mode=mode)


CW_ONE_MINUS_EPS = 0.999999  # advertorch's shrink before arctanh: pixels at 0 and 1 get finite tanh coordinates


def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, c: float = 0.1, kappa: float = 0.01,
          steps: int = 1000, lr: float = 0.01, abort_early: bool = True, mode: str = "eval") -> torch.Tensor:
    """CW_2: the L2 Carlini-Wagner attack (unbounded, minimal perturbation), with one balance constant ``c``.

    Defaults are AdaAD's evaluation (github.com/boyellow/AdaAD, eval_utils.py ``test_robust``, called
    by main_eval.py with ``--coeff 0.1``): advertorch 0.2.3's ``CarliniWagnerL2Attack(model,
    confidence=0.01, max_iterations=1000, learning_rate=0.01, binary_search_steps=1, initial_const=c,
    clip_min=0., clip_max=1., targeted=False)``, so c stays 0.1 (no binary search) and advertorch's
    default ``abort_early=True`` holds. This follows that implementation step for step:

    * tanh space: ``x_adv = tanh(atanh_x + delta) / 2 + 1/2`` with ``atanh_x = atanh((2x - 1) * 0.999999)``
      and ``delta`` optimised by Adam (lr ``lr``) from 0, on
      ``sum ||x_adv - x0||^2 + c * max(z_y - max_{j != y} z_j + kappa, 0)`` over the batch, where
      ``x0`` is ``x`` after the tanh round trip (within ~1e-6 of x);
    * an iterate counts as adversarial when ``argmax(z + kappa * onehot(y)) != y``; per image the
      adversarial iterate with the smallest L2 distance is kept (the logits and image are those of the
      iterate before each Adam step), else the original image is returned unchanged;
    * abort early (as advertorch, on the batch's summed loss): every ``steps // 10`` steps, stop when
      the loss is not below 0.999999 times its value at the previous check. Results therefore depend
      slightly on how the images are batched (AdaAD evaluated batches of 200).

    Gradients are taken with ``torch.autograd.grad`` with respect to ``delta`` only (no parameter
    ``.grad`` is written); logits are cast to fp32; no random numbers are drawn; the result lies in
    [0, 1]. The model runs in ``mode`` ("eval") and gets its previous mode back.
    """
    if c < 0 or kappa < 0 or steps < 0 or lr <= 0:
        raise ValueError(f"c, kappa and steps must be >= 0 and lr > 0 (got {c}, {kappa}, {steps}, {lr})")
    x = x.detach()
    shrunk = (x.clamp(0.0, 1.0) * 2 - 1) * CW_ONE_MINUS_EPS
    atanh_x = torch.log((1 + shrunk) / (1 - shrunk)) * 0.5
    x0 = torch.tanh(atanh_x) * 0.5 + 0.5  # x after the tanh round trip: the origin of the distances
    delta = torch.zeros_like(x, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    best, best_l2 = x.clone(), torch.full((len(x),), 1e10, device=x.device, dtype=x.dtype)
    rows = torch.arange(len(x), device=x.device)
    check_every, prev_loss = max(steps // 10, 1), 1e6
    with bn_mode(model, mode):
        for step in range(steps):
            with torch.enable_grad():
                x_adv = torch.tanh(delta + atanh_x) * 0.5 + 0.5
                logits = model(x_adv).float()
                l2 = ((x_adv - x0) ** 2).flatten(1).sum(dim=1)
                loss = (c * -cw_margin(logits, y, kappa)).sum() + l2.sum()
                (delta.grad,) = torch.autograd.grad(loss, delta)
            optimizer.step()  # the logits, distances and image below are the iterate's before this step
            if abort_early and step % check_every == 0:
                if loss.item() > prev_loss * CW_ONE_MINUS_EPS:
                    break
                prev_loss = loss.item()
            shifted = logits.detach().clone()
            shifted[rows, y] += kappa
            fooled = shifted.argmax(dim=1) != y
            better = fooled & (l2.detach() < best_l2)
            best_l2 = torch.where(better, l2.detach(), best_l2)
            best = torch.where(better.view(-1, *[1] * (x.dim() - 1)), x_adv.detach(), best)
    return best


class _FloatLogits(nn.Module):
    """Wrap a model so it returns fp32 logits (AutoAttack's losses assume full precision)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, version: str = "standard",
               batch_size: int = 250, seed: int = 0, verbose: bool = False,
               attacks: list[str] | None = None) -> torch.Tensor:
    """AutoAttack (L-inf) through the ``pyautoattack`` package; returns the adversarial examples.

    ``version`` is "standard" (APGD-CE, APGD-T, FAB-T, Square), "plus", "rand" or "custom" with
    ``attacks`` a list of 'apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t'. Samples that
    no attack fools are returned unchanged. The model runs in eval mode with its parameters frozen
    (FAB calls backward()); pyautoattack reseeds torch's global RNG, so its state is restored after.
    verbose shows pyautoattack's progress log on stderr.
    """
    if x.shape[0] == 0 or eps == 0:
        return x.detach().clone()
    with _autoattack_context(model, x, verbose):
        adversary = _adversary(model, x, eps=eps, version=version, seed=seed, verbose=verbose, attacks=attacks)
        x_adv, _ = adversary.run_standard_evaluation(x.detach().float(), y.detach().long(), batch_size=batch_size)
    return x_adv.detach()


AA_STAGES = ("clean", "apgd-ce", "apgd-t", "fab-t", "square")  # what fooled an image first (autoattack_stages)


def autoattack_stages(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, seed: int = 0,
                      verbose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard AutoAttack on one batch, one component at a time: ``(x_adv, stage)``, where ``stage[i]``
    is the index in ``AA_STAGES`` of what fooled image i first
    (0: misclassified clean) or -1 when nothing did.

    Each component attacks the images that every earlier one left correct, as one batch, with the same
    seed, so ``x_adv`` and the final robust set equal ``autoattack(..., batch_size=len(x))``'s image by
    image (tests/test_evaluation_scale.py checks it against pyautoattack called directly).
    """
    x, y = x.detach().float(), y.detach().long()
    stage = torch.full((x.shape[0],), -1, dtype=torch.int8, device=x.device)
    with torch.no_grad():
        robust = _correct(model, x, y) if x.shape[0] else torch.zeros(0, dtype=torch.bool, device=x.device)
    stage[~robust] = 0
    x_adv = x.clone()
    if x.shape[0] == 0 or eps == 0:
        return x_adv, stage
    with _autoattack_context(model, x, verbose):
        adversary = _adversary(model, x, eps=eps, version="standard", seed=seed, verbose=verbose)
        for component in list(adversary.attacks_to_run):
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            adversary.attacks_to_run = [component]
            adv, _ = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=idx.numel())
            with torch.no_grad():
                fooled = ~_correct(model, adv, y[idx])
            x_adv[idx[fooled]] = adv[fooled]
            robust[idx[fooled]] = False
            stage[idx[fooled]] = AA_STAGES.index(component)
    return x_adv.detach(), stage


@contextlib.contextmanager
def _autoattack_context(model: nn.Module, x: torch.Tensor, verbose: bool) -> Iterator[contextlib.ExitStack]:
    """Eval mode, frozen parameters (FAB calls backward()), the global RNG state kept (pyautoattack reseeds
    it) and, when verbose, pyautoattack's log on stderr."""
    logger = logging.getLogger("auto-attack")
    rng_devices = [x.device] if x.device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(bn_mode(model, "eval"))
        stack.enter_context(frozen_params(model))
        stack.enter_context(torch.random.fork_rng(devices=rng_devices))
        if verbose:
            handler, previous_level = logging.StreamHandler(sys.stderr), logger.level
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)
            stack.callback(logger.setLevel, previous_level)
            stack.callback(logger.removeHandler, handler)
        yield stack


def _adversary(model: nn.Module, x: torch.Tensor, *, eps: float, version: str, seed: int, verbose: bool,
               attacks: list[str] | None = None):
    from pyautoattack import AutoAttack

    adversary = AutoAttack(_FloatLogits(model), norm="Linf", eps=float(eps), version=version, seed=seed,
                           device=x.device, attacks=attacks if version == "custom" else None)
    adversary.verbose = verbose
    if version == "standard":  # the targeted attacks use at most num_classes - 1 targets
        with torch.no_grad():
            n_classes = model(x[:1].float()).shape[1]
        adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = min(9, n_classes - 1)
        if n_classes < 4:  # targeted DLR needs 4 classes
            adversary.attacks_to_run = [a for a in adversary.attacks_to_run if a != "apgd-t"]
    return adversary
