"""What the offline distillation methods (ARD, RSLAD, AKD², IAD-I/II, AdaAD, AdaIAD) share:
frozen pretrained teachers, the flags that name them, and the teacher diagnostic.

Teachers are loaded by the loop from ``--teacher`` (adversarially trained, the net ``teacher``)
and, for AKD² and IAD-II, ``--natural-teacher`` (naturally trained, ``teacher_nat``): a
raydistill checkpoint folder records its architecture; an external state_dict needs
``--teacher-arch`` / ``--natural-teacher-arch``. They stay in eval() with ``requires_grad``
off and are never DDP-wrapped; methods call them through :meth:`OfflineMethod.frozen`
(no autograd graph at all) except where an attack needs input gradients through them (AdaAD):
there ``Method.attacking`` yields them, as they are, beside the attacked student.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .. import attacks
from ..errors import UsageError
from ..losses import accuracy
from ..models import MODELS
from .base import Method, NetSpec

_SOURCES = "a raydistill checkpoint folder (e.g. the 'checkpoint' of a pgd_at or trades run) or a .pt/.pth state_dict with {}"


class OfflineMethod(Method):
    """A student distilled from frozen teachers (``uses_natural_teacher``: also from T_st)."""

    uses_natural_teacher: ClassVar[bool] = False

    @classmethod
    def validate_config(cls, cfg) -> None:
        if not cfg.teacher:
            raise UsageError(f"{cls.name} needs --teacher: the adversarially trained teacher, "
                             + _SOURCES.format("--teacher-arch"))
        if cls.uses_natural_teacher and not cfg.natural_teacher:
            raise UsageError(f"{cls.name} also needs --natural-teacher: the naturally trained teacher, "
                             + _SOURCES.format("--natural-teacher-arch"))
        for arch in (cfg.teacher_arch, cfg.natural_teacher_arch):
            if arch:
                MODELS.get(arch)  # unknown names are a one-line UsageError

    def networks(self) -> list[NetSpec]:
        # arch "" = the architecture recorded in the checkpoint
        cfg = self.cfg
        specs = [NetSpec("student", cfg.student),
                 NetSpec("teacher", cfg.teacher_arch or "", trainable=False, checkpoint=cfg.teacher, flag="--teacher")]
        if self.uses_natural_teacher:
            specs.append(NetSpec("teacher_nat", cfg.natural_teacher_arch or "", trainable=False,
                                 checkpoint=cfg.natural_teacher, flag="--natural-teacher"))
        return specs

    @staticmethod
    def frozen(nets, name: str, x: torch.Tensor) -> torch.Tensor:
        """Logits of the frozen network ``name`` at ``x``, as a constant target (no autograd graph)."""
        with torch.no_grad():
            return nets._module(name)(x)

    def student_pgd(self, nets, x: torch.Tensor, y: torch.Tensor, ctx) -> torch.Tensor:
        """x~ = argmax CE(S(x~), y): the student's own PGD (ARD, AKD², IAD), in BN mode ``hp.bn_mode``."""
        with self.attacking(nets, ["student"], ctx.hp.bn_mode) as (s,):
            return self.pgd(attacks.ce_loss(s, y), x, ctx, ctx.hp.random_start)

    def diagnostics(self, nets, x, y, ctx):
        """val/teacher_acc_on_student_adv: the teacher's accuracy on PGD examples of the student
        (CE, uniform start, the run's eps, student in eval()): how reliable the teacher's guidance is
        (IAD, Fig. 1)."""
        with self.attacking(nets, ["student"], "eval") as (s,):
            x_adv = self.pgd(attacks.ce_loss(s, y), x, ctx)
        return {"teacher_acc_on_student_adv": accuracy(self.frozen(nets, "teacher", x_adv), y)}
