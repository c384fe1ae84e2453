"""The baselines: Natural, PGD-AT (Madry et al.) and TRADES (Zhang et al.).

They also pretrain the teachers that the offline distillation methods load.
"""
from __future__ import annotations

import torch

from .. import attacks
from ..hparams import WEIGHT
from ..losses import ce, kl
from .base import Method, attack_hparams


class Natural(Method):
    """CE(S(x), y) on clean data. Its best checkpoint is the one with the best validation CLEAN accuracy
    (every other method keeps the best by PGD-10): a natural model is the natural teacher T_st that
    AKD² and IAD-II learn from, and by PGD-10 a digits run kept epoch 3 of 10 (clean 0.960, 0.980 at
    the end)."""

    name = "natural"
    selection = "clean"

    def outer_min(self, nets, x, y, adv, ctx):
        return {"ce": ce(nets.student(x), y)}


class PGDAT(Method):
    """Madry PGD-AT: min CE(S(x*), y), x* = argmax_{||x'-x||<=eps} CE(S(x'), y)."""

    name = "pgd_at"
    hparams = attack_hparams(bn_mode="eval", random_start="uniform")

    def inner_max(self, nets, x, y, ctx):
        with self.attacking(nets, ["student"], ctx.hp.bn_mode) as (s,):
            return {"x_adv": self.pgd(attacks.ce_loss(s, y), x, ctx, ctx.hp.random_start)}

    def outer_min(self, nets, x, y, adv, ctx):
        return {"ce": ce(nets.student(adv["x_adv"]), y)}


class TRADES(Method):
    """TRADES: CE(S(x), y) + beta * KL(S(x) || S(x*)), x* = argmax KL(S(x) || S(x~)).

    As in the authors' code: the attack starts at x + 0.001*randn with the model in eval(), the KL
    is summed over classes and averaged over the batch, and S(x) is not detached in the outer KL.
    """

    name = "trades"
    hparams = {"beta": 6.0, "kl_reduction": "batchmean", **attack_hparams(bn_mode="eval", random_start="normal")}
    ranges = {"beta": WEIGHT}

    def inner_max(self, nets, x, y, ctx):
        with self.attacking(nets, ["student"], ctx.hp.bn_mode) as (s,):
            with torch.no_grad():
                target = torch.softmax(s(x).float(), dim=1)
            return {"x_adv": self.pgd(attacks.kl_loss(s, target), x, ctx, ctx.hp.random_start)}

    def outer_min(self, nets, x, y, adv, ctx):
        logits_clean = nets.student(x)
        logits_adv = nets.student(adv["x_adv"])
        return {"ce": ce(logits_clean, y),
                "kl": ctx.hp.beta * kl(logits_clean, logits_adv, reduction=ctx.hp.kl_reduction)}
