"""CW_2 (``cw2``): checked image by image against advertorch's CarliniWagnerL2Attack, the implementation that
AdaAD's evaluation code calls (github.com/boyellow/AdaAD, eval_utils.py), with the same settings, on a small
CNN trained naturally on digits.

advertorch 0.2.3 (the dev extra) predates torch 1.9; its package import needs
``torch.autograd.gradcheck.zero_gradients`` (used only by its FAB attack), which the fixture stubs while it
imports advertorch.
"""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import natural_digits_model
from raydistill.evaluation import ATTACKS, evaluate

N = 32  # test images attacked: ~5 s for each implementation on one CPU thread (the batch aborts early at step 800)
SETTINGS = dict(c=0.1, kappa=0.01, steps=1000, lr=0.01)  # AdaAD's: initial_const, confidence, max_iterations, lr
TOL = 1e-6  # see test_cw2_equals_advertorch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: see conftest


@pytest.fixture(scope="module")
def trained(one_thread):
    """(model, x, y): small_cnn trained naturally on digits (4 epochs of batch 64, about a second) and the
    first N test images."""
    from raydistill.data import to_float

    model, data = natural_digits_model()
    return model, to_float(data.test_x[:N]), data.test_y[:N]


@pytest.fixture(scope="module")
def attacked(trained):
    """cw2's images through the registry, the model left in train mode beforehand, with what the call left
    behind: (x_adv, the modules' training flags after, whether any parameter has a .grad)."""
    model, x, y = trained
    model.train()
    try:
        x_adv = ATTACKS.get("cw2").run(model, x, y, eps=0.2, step_size=0.05, generator=torch.Generator(), seed=0)
        flags = [m.training for m in model.modules()]
        grads = any(p.grad is not None for p in model.parameters())
    finally:
        model.eval()
    return x_adv, flags, grads


@pytest.fixture(scope="module")
def advertorch_cw():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys.modules["torch.autograd.gradcheck"], "zero_gradients", lambda x: None, raising=False)
        from advertorch.attacks import CarliniWagnerL2Attack
    return CarliniWagnerL2Attack


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def test_cw2_equals_advertorch(trained, attacked, advertorch_cw):
    """AdaAD's exact call (eval_utils.py, test_robust, attack_type "cw", c = --coeff 0.1). The two
    implementations do the same float32 operations in the same order, so on one machine the images agree
    bit for bit (measured: max difference 0.0). The tolerance, 1e-6 (about 8 float32 steps at 1.0), only
    leaves room for a differently vectorised kernel; it is 60000 times below one digits grey level (1/16),
    and an attack that differed in any step (the loss, the tanh box, Adam's update, the early abort, the
    smallest-L2 selection) would miss it by orders of magnitude over 1000 steps."""
    model, x, y = trained
    x_cw, _, _ = attacked
    ref = advertorch_cw(model, num_classes=10, confidence=SETTINGS["kappa"], max_iterations=SETTINGS["steps"],
                        clip_min=0., clip_max=1., learning_rate=SETTINGS["lr"], targeted=False,
                        binary_search_steps=1, initial_const=SETTINGS["c"]).perturb(x, y)
    model.zero_grad(set_to_none=True)  # advertorch calls loss.backward(): parameter grads
    assert (x_cw - ref).abs().max().item() <= TOL
    assert accuracy(model, x_cw, y) == accuracy(model, ref, y)
    moved = (x_cw - x).flatten(1).norm(dim=1) > 1e-3
    assert moved.sum() >= N // 2  # the check is not vacuous: most images were changed


def test_cw2_is_a_minimal_l2_attack(trained, attacked):
    model, x, y = trained
    x_cw, flags, grads = attacked
    assert all(flags) and not grads  # train mode restored; no parameter .grad written
    assert x_cw.shape == x.shape and x_cw.dtype == x.dtype
    assert x_cw.min() >= 0.0 and x_cw.max() <= 1.0
    clean, robust = accuracy(model, x, y), accuracy(model, x_cw, y)
    assert clean >= 0.9 and robust <= clean and robust < 0.3 * clean
    with torch.no_grad():
        fooled = model(x_cw).argmax(dim=1) != y
        correct = model(x).argmax(dim=1) == y
    assert torch.equal(x_cw[~fooled], x[~fooled])  # no adversarial example found: the original image
    l2 = (x_cw - x).flatten(1).norm(dim=1)[fooled & correct]
    assert l2.max() < 2.0 and l2.median() < 1.0  # small perturbations of 8x8 images (norm of x: ~4)


def test_cw2_in_evaluate_ignores_eps(trained):
    """Through ``evaluate``: CW_2 is unbounded, so eps (0 here: no L-inf attack changes anything) is ignored."""
    model, x, y = trained
    res = evaluate(model, x[:16], y[:16], ["clean", "pgd10", "cw2"], eps=0.0)
    assert res["clean_acc"] == res["pgd10_acc"] >= 0.75  # eps 0 changes nothing; a trained model (14 of 16 on AMD EPYC)
    assert res["cw2_acc"] < 0.5 * res["clean_acc"]
    assert "1000" in ATTACKS.get("cw2").description and "0.1" in ATTACKS.get("cw2").description
