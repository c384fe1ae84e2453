"""The PGD core, its objectives, bn_mode and the evaluation attacks (tiny models, CPU, a few seconds)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydistill import attacks as A

EPS = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: see conftest


def tiny_cnn(seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, classes))


def inputs(kind: str, n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "zeros":
        return torch.zeros(n, 1, 8, 8)
    if kind == "ones":
        return torch.ones(n, 1, 8, 8)
    if kind == "binary":  # every pixel on an edge of [0, 1]
        return torch.randint(0, 2, (n, 1, 8, 8), generator=g).float()
    return torch.rand(n, 1, 8, 8, generator=g)


def labels(n: int = 16) -> torch.Tensor:
    return torch.arange(n) % 10


def all_attacks(model: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float):
    """Every way the package produces adversarial examples, by name."""
    probs = torch.softmax(teacher(x), dim=1).detach()
    common = dict(eps=eps, step_size=eps / 4, steps=5)
    yield "pgd-ce-uniform", A.pgd(A.ce_loss(model, y), x, random_start="uniform", **common)
    yield "pgd-ce-normal", A.pgd(A.ce_loss(model, y), x, random_start="normal", **common)
    yield "pgd-kl-none", A.pgd(A.kl_loss(model, probs, tau=2.0), x, random_start="none", **common)
    yield "pgd-kl-between", A.pgd(A.kl_between(teacher, model), x, random_start="normal", **common)
    yield "pgd-cw", A.pgd(A.cw_loss(model, y, 50.0), x, **common)
    yield "pgd_attack-restarts", A.pgd_attack(model, x, y, restarts=3, **common)
    yield "fgsm", A.fgsm(model, x, y, eps=eps)
    yield "cw_linf", A.cw_linf(model, x, y, eps=eps, step_size=eps / 4, steps=5)
    yield "autoattack", A.autoattack(model, x, y, eps=eps, version="custom", attacks=["apgd-ce", "fab-t"])


@pytest.mark.parametrize("kind", ["random", "zeros", "ones", "binary"])
def test_every_attack_stays_in_the_ball_and_the_box_and_writes_no_grad(kind):
    model, teacher = tiny_cnn(0), tiny_cnn(1)
    x, y = inputs(kind), labels()
    for name, x_adv in all_attacks(model, teacher, x, y, EPS):
        assert x_adv.shape == x.shape and not x_adv.requires_grad, name
        assert (x_adv - x).abs().max().item() <= EPS + 1e-6, name
        assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0, name
    for net in (model, teacher):
        assert all(p.grad is None and p.requires_grad for p in net.parameters())
        assert net.training  # no attack changed the mode for good


def test_eps_zero_returns_x():
    model, teacher = tiny_cnn(0), tiny_cnn(1)
    x, y = inputs("random"), labels()
    for name, x_adv in all_attacks(model, teacher, x, y, 0.0):
        assert torch.equal(x_adv, x), name


def test_pgd_moves_to_the_corners_and_works_under_no_grad():
    torch.manual_seed(0)
    model, x, y = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), inputs("random"), labels()  # no zero gradients
    with torch.no_grad():
        x_adv = A.pgd(A.ce_loss(model, y), x, eps=EPS, step_size=EPS, steps=3, random_start="none")
    delta = (x_adv - x).abs()
    inside = (x > EPS) & (x < 1 - EPS)  # pixels whose eps-ball is not cut by [0, 1]
    assert torch.allclose(delta[inside], torch.full_like(delta[inside], EPS), atol=1e-6)


def test_random_starts_are_reproducible_with_a_generator():
    model, x, y = tiny_cnn(0), inputs("random"), labels()
    runs = [A.pgd(A.ce_loss(model, y), x, eps=EPS, step_size=0.01, steps=2,
                  generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    start = A.start_point(x, EPS, "normal", 0.001, torch.Generator().manual_seed(0))
    assert 0 < (start - x).abs().max().item() < 0.01  # PeerAiD/AdaAD-style 0.001 * N(0, 1)
    start = A.start_point(x, EPS, "uniform", generator=torch.Generator().manual_seed(0))
    assert 0.9 * EPS < (start - x).abs().max().item() <= EPS
    with pytest.raises(ValueError):
        A.pgd(A.ce_loss(model, y), x, eps=EPS, step_size=0.01, steps=1, random_start="gauss")


# ----------------------------------------------------------------------------- objectives
def test_cw_loss_matches_hand_computed_values():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0], [3.0, 1.0, 0.0]])
    y = torch.tensor([1, 0, 1])
    ident = nn.Identity()
    # z_y - max_{j != y} z_j = 1, 4, -2
    assert torch.allclose(A.cw_loss(ident, y, kappa=0.0)(logits), torch.tensor([-1.0, -4.0, 0.0]))
    assert torch.allclose(A.cw_loss(ident, y, kappa=50.0)(logits), torch.tensor([-51.0, -54.0, -48.0]))


def test_kl_objectives_match_hand_computed_values():
    ident = nn.Identity()
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])  # softmax = (1/4, 3/4)
    target = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    expected = torch.tensor([0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), -math.log(0.25)])
    assert torch.allclose(A.kl_loss(ident, target)(logits), expected, atol=1e-6)
    # tau = 2 halves the logits: softmax = (1, sqrt 3) / (1 + sqrt 3)
    q0 = 1 / (1 + math.sqrt(3))
    expected_tau = torch.tensor([0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / (1 - q0)), -math.log(q0)])
    assert torch.allclose(A.kl_loss(ident, target, tau=2.0)(logits), expected_tau, atol=1e-6)
    # kl_between(T, S): teacher logits give (1/2, 1/2), the student's (1/4, 3/4)
    teacher, student = nn.Identity(), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]))
    x = torch.tensor([[1.0, 1.0]])  # teacher logits (1, 1), student logits (0, ln 3)
    assert torch.allclose(A.kl_between(teacher, student)(x), expected[:1], atol=1e-6)


def test_objectives_are_fp32_under_bf16_autocast():
    model, teacher = tiny_cnn(0), tiny_cnn(1)
    x, y = inputs("random"), labels()
    probs = torch.softmax(teacher(x), 1).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        for objective in (A.ce_loss(model, y), A.kl_loss(model, probs), A.kl_between(teacher, model),
                          A.cw_loss(model, y)):
            assert objective(x).dtype == torch.float32


def test_kl_between_gradient_flows_through_both_models():
    teacher, student = tiny_cnn(1), tiny_cnn(0)
    x = inputs("random").requires_grad_(True)
    A.kl_between(teacher, student)(x).sum().backward()
    for net in (teacher, student):
        assert all(p.grad is not None for p in net.parameters())
        assert sum(p.grad.abs().sum().item() for p in net.parameters()) > 0
    # the input gradient differs from the one with the teacher held fixed (kl_loss)
    x2 = inputs("random").requires_grad_(True)
    probs = torch.softmax(teacher(x2), 1).detach()
    (g_fixed,) = torch.autograd.grad(A.kl_loss(student, probs)(x2).sum(), x2)
    (g_both,) = torch.autograd.grad(A.kl_between(teacher, student)(x2).sum(), x2)
    assert not torch.allclose(g_fixed, g_both)


# ----------------------------------------------------------------------------- modes
def test_bn_mode_sets_and_restores_every_submodule():
    model = tiny_cnn(0)
    model.train()
    model[1].eval()  # a frozen BN inside a training model must stay frozen afterwards
    before = [m.training for m in model.modules()]
    with A.bn_mode(model, "eval"):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    with A.bn_mode([model], "train"):
        assert all(m.training for m in model.modules())
    with A.bn_mode(model, "keep"):
        assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError), A.bn_mode(model, "eval"):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before
    with pytest.raises(ValueError), A.bn_mode(model, "test"):
        pass


def test_evaluation_attacks_run_in_eval_mode_and_leave_bn_statistics_alone():
    model = tiny_cnn(0).train()
    stats = model[1].running_mean.clone()
    A.pgd_attack(model, inputs("random"), labels(), eps=EPS, step_size=EPS / 4, steps=3)
    A.autoattack(model, inputs("random"), labels(), eps=EPS, version="custom", attacks=["apgd-ce"])
    assert torch.equal(model[1].running_mean, stats) and model.training


def test_autoattack_keeps_the_global_rng_state():
    model = tiny_cnn(0)
    state = torch.get_rng_state()
    A.autoattack(model, inputs("random"), labels(), eps=EPS, version="custom", attacks=["apgd-ce"], seed=3)
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------- strength on a trained model
@pytest.fixture(scope="module")
def digits_linear():
    """Logistic regression on scikit-learn's digits (full batch, well under a second)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), x[:300], y[:300]


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_pgd_gets_stronger_with_more_steps_and_restarts(digits_linear):
    model, x, y = digits_linear
    eps = 0.1
    clean = accuracy(model, x, y)
    assert clean > 0.9
    accs = {steps: accuracy(model, A.pgd_attack(model, x, y, eps=eps, step_size=eps / 4, steps=steps,
                                                generator=torch.Generator().manual_seed(0)), y)
            for steps in (1, 20)}
    assert accs[20] < accs[1] - 0.05 and accs[1] <= clean
    fgsm = accuracy(model, A.fgsm(model, x, y, eps=eps), y)
    assert accs[20] <= fgsm
    one, three = (accuracy(model, A.pgd_attack(model, x, y, eps=eps, step_size=eps / 4, steps=3, restarts=r,
                                               generator=torch.Generator().manual_seed(0)), y) for r in (1, 3))
    assert three <= one  # restarts only ever add fooled samples
    cw = accuracy(model, A.cw_linf(model, x, y, eps=eps, step_size=eps / 4, steps=30), y)
    assert cw < clean
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("classes", [3, 5])
def test_standard_autoattack_with_fewer_than_ten_classes(classes):
    """Targets are capped at num_classes - 1, and targeted DLR is dropped below 4 classes."""
    torch.manual_seed(classes)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, classes))
    x, y = inputs("random"), torch.arange(16) % classes
    x_adv = A.autoattack(model, x, y, eps=EPS)
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert accuracy(model, x_adv, y) <= accuracy(model, x, y)
