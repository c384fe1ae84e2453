"""MART, Misclassification Aware adveRsarial Training (Wang et al., ICLR 2020), as a raydistill plugin.

Y. Wang, D. Zou, J. Yi, J. Bailey, X. Ma, Q. Gu: "Improving Adversarial Robustness Requires Revisiting
Misclassified Examples", ICLR 2020 (https://openreview.net/forum?id=rklOg6EFwS); the authors' code:
https://github.com/YisenWang/MART (mart.py, train_resnet.py, train_wideresnet.py; read at commit 2d83e17).

This file is the whole method. It imports raydistill.extend only (and PyTorch), so it runs as an installed
package (``pip install examples/mart``: entry point ``mart`` in group ``raydistill.methods``) and as a single
file (``--plugin examples/mart/raydistill_mart/mart_method.py``) alike. (Its name is not ``mart.py``: a file
plugin is imported under its file's name, which must not be that of another importable module, such as the
folder ``mart/`` this example is copied to.)

The objective (the paper's L^MART), with p(x) = softmax of the network's logits at x, averaged over a batch:

    x'   = argmax_{||x' - x||_inf <= eps} CE(p(x'), y)                 (inner maximisation: PGD on the CE)
    BCE  = -log p_y(x') - log(1 - max_{k != y} p_k(x'))                 (boosted cross-entropy)
    L    = BCE + lambda * KL(p(x) || p(x')) * (1 - p_y(x))

BCE is the adversarial cross-entropy plus a margin term that pushes down the most probable wrong class. The
KL term is TRADES' regulariser weighted per example by 1 - p_y(x): close to 1 for an example the network
misclassifies, close to 0 for one it gets right with confidence. lambda is ``beta`` here, as in the code.

What the authors' mart_loss computes (their mart.py; z = the logits, B the batch size):

* the attack: the model in eval(), x_adv = x + 0.001 * N(0, 1), then ``perturb_steps`` steps of
  x_adv + step_size * sign(grad of CE(z(x_adv), y)), each projected onto the eps-ball and [0, 1];
* y2 = the most probable class other than y (of the two most probable classes of p(x_adv), the one that is
  not y); loss_adv = CE(z(x_adv), y) + mean over the batch of -log(1.0001 - p_y2(x_adv) + 1e-12);
* loss_robust = (1 / B) * sum_i KL(p(x_i) || p(x_adv_i)) * (1.0000001 - p_y_i(x_i)), the KL from
  KLDivLoss(reduction='none') of log(p(x_adv) + 1e-12) against p(x), summed over the classes;
* loss = loss_adv + beta * loss_robust. Nothing is detached: p(x) and the weight are trained through.

This module computes the same terms, with these differences (none changes what is optimised):

* the KL goes through log-softmax (raydistill.extend.losses.kl) instead of log(softmax + 1e-12): equal while
  no probability falls below 1e-12, and finite where one does;
* the weight is the paper's 1 - p_y(x): the code's 1.0000001 adds at most 1e-7 x the KL;
* the margin term keeps the code's 1.0001 and 1e-12: they bound it by -log(1e-4) = 9.21 where p_y2(x') = 1;
* the attack is the project's one PGD (raydistill.extend.attacks.pgd) from the code's start (random_start
  ``normal``) with the network in eval() (bn_mode ``eval``); it projects the start point into the ball and
  [0, 1] before the first step, the code only after it.

Hyperparameters: ``beta`` (default 6.0, mart_loss's default and train_wideresnet.py's), ``bn_mode`` and
``random_start`` of the training attack (the shared choices). Each epoch logs ``train/mart_weight``, the mean
of 1 - p_y(x): the share of the batch the KL term works on.

Presets: ``cifar10`` follows train_resnet.py (ResNet-18, the project's default student): 120 epochs, batch
128, lr 0.01 x0.1 at its epochs 75, 90 and 100 (counted from 1 there: 74, 89 and 99 here, counted from 0),
momentum 0.9, weight decay 3.5e-3, beta 5.0, 10 attack steps. The threat model stays the dataset's, eps 8/255
and step 2/255 (the script's 0.031 and 0.007: ``--step-size 0.007`` gives its step). train_wideresnet.py's
WideResNet-34-10 differs in beta 6.0, lr 0.1, weight decay 7e-4 and 90 epochs: ``--student wrn34_10 --set
beta=6 --lr 0.1 --weight-decay 7e-4 --epochs 90``. On other datasets: the dataset's defaults, beta 6.0.
"""
from __future__ import annotations

import torch

from raydistill.extend import WEIGHT, Method, attack_hparams, attacks, losses

MARGIN_ONE, MARGIN_TINY = 1.0001, 1e-12  # the authors' constants in -log(1.0001 - p_y2(x') + 1e-12)


def mart_terms(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """MART's terms before the batch mean: per example ``ce`` = -log p_y(x'), ``margin`` = -log(1 - max_{k != y}
    p_k(x')) (with the code's constants) and ``weight`` = 1 - p_y(x); and ``kl``, the batch mean of
    KL(p(x) || p(x')) * weight (the term beta multiplies). Gradients flow into both logits, the weight included."""
    probs_adv = torch.softmax(logits_adv.float(), dim=1)
    wrong = probs_adv.scatter(1, y[:, None], -1.0).amax(dim=1)  # max_{k != y} p_k(x')
    weight = 1.0 - torch.softmax(logits_nat.float(), dim=1).gather(1, y[:, None]).squeeze(1)
    return {"ce": torch.nn.functional.cross_entropy(logits_adv.float(), y, reduction="none"),
            "margin": -torch.log(MARGIN_ONE - wrong + MARGIN_TINY),
            "weight": weight,
            "kl": losses.kl(logits_nat, logits_adv, reduction="batchmean", weight=weight)}


class MART(Method):
    """BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)), x' from PGD on the cross-entropy."""

    name = "mart"
    hparams = {"beta": 6.0, **attack_hparams(bn_mode="eval", random_start="normal")}
    ranges = {"beta": WEIGHT}
    presets = {"cifar10": {"epochs": 120, "batch_size": 128, "lr": 0.01, "lr_milestones": [74, 89, 99],
                           "weight_decay": 3.5e-3, "attack_steps": 10, "hp": {"beta": 5.0}}}
    search_space = "mart.yaml"  # next to this file: what `tune mart` and a study search by default

    def inner_max(self, nets, x, y, ctx):
        with self.attacking(nets, ["student"], ctx.hp.bn_mode) as (s,):
            return {"x_adv": self.pgd(attacks.ce_loss(s, y), x, ctx, ctx.hp.random_start)}

    def outer_min(self, nets, x, y, adv, ctx):
        t = mart_terms(nets.student(x), nets.student(adv["x_adv"]), y)
        ctx.record("mart_weight", t["weight"])
        return {"ce": t["ce"].mean(), "margin": t["margin"].mean(), "kl": ctx.hp.beta * t["kl"]}
