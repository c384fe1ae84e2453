"""PeerAiD's training step as the authors' code computes it: the baseline of the speed targets.

``python -m raydistill.bench --compare-authors-peeraid`` races it against our step (it loads this
file from the checkout); ``tests/test_bench.py`` checks that it makes our update with one student
forward and backward more.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def authors_peeraid_step(runner, x: Tensor, y: Tensor, ctx) -> None:
    """One PeerAiD step of ``runner`` (a ``raydistill.steprunner.StepRunner``) as the authors' code
    computes it, with ``ctx`` from ``runner.context()``.

    fp32; the peer's clean prediction under no_grad in eval(); the attack in eval() on the summed
    KL from an unclamped x + 0.001·N(0, 1), with the student's parameters requiring gradients;
    then, in train(), P(x*), S(x*) for the peer's loss, S(x*) again and S(x) for the student's
    loss; one backward, both SGD steps (the runner's optimizers). The same equations as
    raydistill.methods.peeraid with its defaults.
    """
    hp = ctx.hp
    student, peer = runner.network("student"), runner.network("peer")
    peer.eval()
    with torch.no_grad():
        target = F.softmax(peer(x), dim=1)
    student.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, device=x.device)
    for _ in range(ctx.attack_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.kl_div(F.log_softmax(student(x_adv), dim=1), target, reduction="sum")
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + ctx.step_size * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - ctx.eps), x + ctx.eps), 0.0, 1.0)
    student.train()
    peer.train()

    def kl_mean(logits: Tensor, target_logits: Tensor, tau: float) -> Tensor:  # nn.KLDivLoss(): mean over B·C
        target = F.softmax(target_logits / tau, dim=1)
        return F.kl_div(F.log_softmax(logits / tau, dim=1), target, reduction="sum") / target.numel()

    p_adv = peer(x_adv)
    loss_peer = hp.gamma1 * F.cross_entropy(p_adv, y) + hp.gamma2 * hp.tau_p ** 2 * kl_mean(p_adv, student(x_adv), hp.tau_p)
    s_adv, s_clean = student(x_adv), student(x)
    loss_student = (hp.lambda1 * F.cross_entropy(s_adv, y) + hp.lambda2 * hp.tau ** 2 * kl_mean(s_adv, p_adv.detach(), hp.tau)
                    + hp.lambda3 * hp.tau ** 2 * kl_mean(s_adv, s_clean, hp.tau))
    runner.update(loss_peer + loss_student)
