"""ARD, Adversarially Robust Distillation (Goldblum et al., AAAI 2020).

    min (1 - alpha) * CE(S(x), y) + alpha * tau^2 * KL(T^tau(x) || S^tau(x*)),
    x* = argmax_{||x~ - x|| <= eps} CE(S(x~), y)

Defaults are the authors' code: tau = 30, alpha = 1 (so S(x) is not even evaluated), the KL
averaged over batch x classes (KLDivLoss() default), the attack with the student in train() mode
from a uniform start; the teacher sees the clean x (``teacher_input=adv`` feeds it x*).
Learning rate: the authors' code meant to divide it by 10 at epochs 100 and 150, but its
``adjust_learning_rate`` recomputes from the initial value, so the second decay never happens
(0.01 from epoch 100 on). The presets use the intended schedule [100, 150]; ``--lr-milestones 100``
reproduces the code's.
"""
from __future__ import annotations

from ..hparams import FRACTION, POSITIVE
from ..losses import ce, kl
from ._teachers import OfflineMethod
from .base import attack_hparams

CIFAR = {"epochs": 200, "lr_milestones": [100, 150], "weight_decay": 2e-4}  # intended schedule, see above


class ARD(OfflineMethod):
    name = "ard"
    hparams = {"alpha": 1.0, "tau": 30.0, "kl_reduction": "mean",
               **attack_hparams(bn_mode="train", random_start="uniform"), "teacher_input": "clean"}
    choices = {"teacher_input": ("clean", "adv")}
    ranges = {"alpha": FRACTION, "tau": POSITIVE}  # alpha: (1 - alpha) * CE + alpha * KL
    presets = {
        "cifar10": CIFAR,
        "cifar100": CIFAR,
        # The IAD paper's TinyImageNet baseline (its own ARD code: tau 1, sum/B): CE weight 1 - alpha = 0.9.
        "tinyimagenet": {"epochs": 100, "lr_milestones": [50, 80], "weight_decay": 5e-4,
                         "hp": {"alpha": 0.1, "tau": 1.0, "kl_reduction": "batchmean"}},
    }

    def inner_max(self, nets, x, y, ctx):
        return {"x_adv": self.student_pgd(nets, x, y, ctx)}

    def outer_min(self, nets, x, y, adv, ctx):
        hp, x_adv = ctx.hp, adv["x_adv"]
        t = self.frozen(nets, "teacher", x if hp.teacher_input == "clean" else x_adv)
        losses = {"kl": hp.alpha * hp.tau ** 2 * kl(t, nets.student(x_adv), hp.tau, hp.kl_reduction)}
        if hp.alpha != 1:
            losses["ce"] = (1 - hp.alpha) * ce(nets.student(x), y)
        return losses
