"""Loss terms shared by the methods, written to match the papers' notation.

``kl(p_logits, q_logits, tau)`` is KL(p^tau || q^tau) with p the target distribution (first
argument), q the model being trained, both from logits softened by the temperature tau.
Reductions (METHODS.md, "KL reduction"):

* ``"batchmean"``: sum over classes, mean over the batch (IAD, TRADES, AdaAD on CIFAR-100);
* ``"mean"``: mean over batch x classes, PyTorch's KLDivLoss() default (PeerAiD, ARD, RSLAD,
  AdaAD on CIFAR-10) - C times smaller for the same coefficient.

Per-sample weights (IAD's alpha_i) multiply each sample's KL before the reduction. Logits are
cast to fp32 so a bf16 autocast never changes the loss arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("batchmean", "mean")


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, tau: float = 1.0, reduction: str = "batchmean",
       weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(p/tau) || softmax(q/tau)); gradients flow into whichever inputs require them."""
    log_q = F.log_softmax(q_logits.float() / tau, dim=1)
    log_p = F.log_softmax(p_logits.float() / tau, dim=1)
    per_sample = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return reduce(per_sample, q_logits.shape[1], reduction, weight)


def kl_to_probs(p: torch.Tensor, q_logits: torch.Tensor, tau: float = 1.0, reduction: str = "batchmean",
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || softmax(q/tau)) for a given target distribution p (e.g. an amalgamated teacher)."""
    log_q = F.log_softmax(q_logits.float() / tau, dim=1)
    p = p.float()
    per_sample = (torch.xlogy(p, p) - p * log_q).sum(dim=1)
    return reduce(per_sample, q_logits.shape[1], reduction, weight)


def ce(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy, mean over the batch (optionally per-sample weighted)."""
    per_sample = F.cross_entropy(logits.float(), y, reduction="none")
    return reduce(per_sample, 1, "batchmean", weight)


def reduce(per_sample: torch.Tensor, num_classes: int, reduction: str, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is not None:
        per_sample = per_sample * weight
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "mean":
        return per_sample.mean() / num_classes
    raise ValueError(f"unknown KL reduction {reduction!r}; choose from {REDUCTIONS}")


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample correctness (float 0/1)."""
    return (logits.argmax(dim=1) == y).float()
