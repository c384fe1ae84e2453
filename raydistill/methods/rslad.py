"""RSLAD, Robust Soft Label Adversarial Distillation (Zi et al., ICCV 2021).

    min alpha * KL(T(x) || S(x*)) + (1 - alpha) * KL(T(x) || S(x)),   alpha = 5/6,
    x* = argmax_{||x~ - x|| <= eps} KL(T(x) || S(x~))

The teacher's clean prediction T(x), the robust soft label, is the target of the attack and of
both outer terms: it is computed once per step and handed from the inner to the outer problem.
As in the authors' code: KL averaged over batch x classes, attack with the student in eval() mode
from x + 0.001 * N(0, 1); 300 epochs with decays at 215, 260 and 285, weight decay 2e-4.
"""
from __future__ import annotations

import torch

from .. import attacks
from ..hparams import FRACTION
from ..losses import kl
from ._teachers import OfflineMethod
from .base import attack_hparams

CIFAR = {"epochs": 300, "lr_milestones": [215, 260, 285], "weight_decay": 2e-4}


class RSLAD(OfflineMethod):
    name = "rslad"
    hparams = {"alpha": 5 / 6, "kl_reduction": "mean", **attack_hparams(bn_mode="eval", random_start="normal")}
    ranges = {"alpha": FRACTION}
    presets = {"cifar10": CIFAR, "cifar100": CIFAR}

    def inner_max(self, nets, x, y, ctx):
        t_clean = self.frozen(nets, "teacher", x)
        with self.attacking(nets, ["student"], ctx.hp.bn_mode) as (s,):
            x_adv = self.pgd(attacks.kl_loss(s, torch.softmax(t_clean.float(), dim=1)), x, ctx, ctx.hp.random_start)
        return {"x_adv": x_adv, "t_clean": t_clean}

    def outer_min(self, nets, x, y, adv, ctx):
        hp, t = ctx.hp, adv["t_clean"]
        return {"kl_adv": hp.alpha * kl(t, nets.student(adv["x_adv"]), reduction=hp.kl_reduction),
                "kl_clean": (1 - hp.alpha) * kl(t, nets.student(x), reduction=hp.kl_reduction)}
