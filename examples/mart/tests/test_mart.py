"""MART (raydistill_mart): its loss against a hand computation, the per-example weighting, the attack's
eps-ball, its search space, and one epoch on digits that learns (in process, no Ray, no MLflow).

They run from the raydistill repository (its pytest testpaths include this folder) and from an installed copy
alike: raydistill_mart is imported from this checkout when it is not installed. (No conftest.py here: the
repository's tests import their own conftest by that name.)
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

if importlib.util.find_spec("raydistill_mart") is None:  # not installed (pip install examples/mart): this copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydistill_mart import MART, mart_terms  # noqa: E402


@pytest.fixture
def mart():
    """The MART class, registered as method ``mart`` for the test where no plugin loading registered it (the
    registry is left as it was found)."""
    from raydistill.methods import METHODS

    added = "mart" not in METHODS
    if added:
        METHODS.add("mart", MART)
    yield MART
    if added:
        METHODS._items.pop("mart", None)

# two examples, three classes; example 0 is classified correctly on x (class 0), example 1 is not (class 2
# has the smallest clean logit); on x' the most probable wrong class is 1 for example 0 and 0 for example 1
NAT = np.array([[2.0, 0.5, -1.0], [0.2, 1.5, 0.1]])
ADV = np.array([[1.0, 1.2, -0.5], [0.9, 0.4, 0.3]])
Y = np.array([0, 2])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def by_hand(beta: float) -> dict[str, float]:
    """The paper's objective with the authors' margin constants, in numpy."""
    p, q, rows = softmax(NAT), softmax(ADV), np.arange(len(Y))
    ce = -np.log(q[rows, Y])
    wrong = np.array([max(q[i, k] for k in range(3) if k != Y[i]) for i in rows])
    margin = -np.log(1.0001 - wrong + 1e-12)
    kl = (p * (np.log(p) - np.log(q))).sum(axis=1)
    weight = 1 - p[rows, Y]
    return {"ce": ce.mean(), "margin": margin.mean(), "kl": beta * (kl * weight).mean(),
            "total": (ce + margin + beta * kl * weight).mean(), "weight": weight}


def test_the_loss_equals_a_hand_computation():
    t = mart_terms(torch.tensor(NAT), torch.tensor(ADV), torch.tensor(Y))
    want = by_hand(beta=6.0)
    assert t["ce"].mean().item() == pytest.approx(want["ce"], rel=1e-6)
    assert t["margin"].mean().item() == pytest.approx(want["margin"], rel=1e-6)
    assert 6.0 * t["kl"].item() == pytest.approx(want["kl"], rel=1e-6)
    assert t["weight"].tolist() == pytest.approx(want["weight"].tolist(), rel=1e-6)
    # the wrong class of the margin term is the most probable one other than y, not the most probable one
    assert torch.softmax(torch.tensor(ADV), 1).argmax(1).tolist() == [1, 0]


def test_the_step_sums_the_terms_with_beta(mart):
    """outer_min's named terms sum (as the loop sums them) to the objective, at beta = 2."""
    from raydistill.config import resolve
    from raydistill.methods import HP, NetSpec, Nets, StepContext

    cfg = resolve("mart", {"dataset": "digits", "workers": 0}, {"beta": "2"})
    method = mart(cfg)
    logits = {id_: torch.tensor(z) for id_, z in (("nat", NAT), ("adv", ADV))}
    x, x_adv = torch.zeros(2, 1), torch.ones(2, 1)

    class Table(nn.Module):  # returns the fixed logits of x and of x'
        def forward(self, inp):
            return logits["adv"] if bool(inp[0, 0] == 1) else logits["nat"]

    net = Table()
    nets = Nets({"student": net}, {"student": net}, [NetSpec("student", "table")])
    ctx = StepContext(eps=0.1, step_size=0.025, attack_steps=1, hp=HP(cfg.hp))
    terms = method.outer_min(nets, x, torch.tensor(Y), {"x_adv": x_adv}, ctx)
    assert set(terms) == {"ce", "margin", "kl"}
    assert sum(v.item() for v in terms.values()) == pytest.approx(by_hand(beta=2.0)["total"], rel=1e-6)
    s, n = ctx.stats["mart_weight"]
    assert n == 2 and s.item() == pytest.approx(by_hand(2.0)["weight"].sum(), rel=1e-6)


def test_misclassified_examples_weigh_more_and_the_weight_is_trained_through():
    """An example classified right with confidence adds almost nothing to the KL term, a misclassified one
    nearly its whole KL; the weight 1 - p_y(x) is not detached (the authors' code): its gradient reaches
    the clean logits."""
    nat = torch.tensor([[8.0, 0.0, 0.0], [0.0, 0.0, 8.0]], requires_grad=True)  # y = 0: right, wrong
    adv = torch.tensor([[0.0, 3.0, 0.0], [3.0, 0.0, 0.0]])
    y = torch.tensor([0, 0])
    per_example = [mart_terms(nat[i:i + 1], adv[i:i + 1], y[i:i + 1]) for i in range(2)]
    w = [t["weight"].item() for t in per_example]
    assert w[0] < 1e-3 and w[1] > 0.999
    kl = [t["kl"].item() for t in per_example]  # KL * weight of each example alone
    assert kl[0] < 1e-3 * kl[1]
    t = mart_terms(nat, adv, y)
    assert t["kl"].item() == pytest.approx((kl[0] + kl[1]) / 2, rel=1e-6)
    (grad,) = torch.autograd.grad(t["kl"], nat)
    # the same KL with the weight held constant: a different gradient
    from raydistill.extend import losses

    fixed = losses.kl(nat, adv, weight=t["weight"].detach())
    (grad_fixed,) = torch.autograd.grad(fixed, nat)
    assert not torch.allclose(grad, grad_fixed)


def test_adversarial_examples_stay_in_the_eps_ball_and_raise_the_loss(mart):
    from raydistill.config import resolve
    from raydistill.methods import HP, NetSpec, Nets, StepContext

    torch.manual_seed(0)
    cfg = resolve("mart", {"dataset": "digits", "workers": 0})
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    nets = Nets({"student": net}, {"student": net}, [NetSpec("student", "mlp")])
    ctx = StepContext(eps=cfg.eps, step_size=cfg.step_size, attack_steps=cfg.attack_steps, hp=HP(cfg.hp))
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    x_adv = mart(cfg).inner_max(nets, x, y, ctx)["x_adv"]
    assert (cfg.eps, cfg.attack_steps) == (0.1, 10)  # digits' threat model
    assert (x_adv - x).abs().max().item() <= cfg.eps + 1e-6
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    assert (x_adv - x).abs().max().item() > cfg.eps / 2  # it moved
    ce = nn.functional.cross_entropy
    assert ce(net(x_adv), y).item() > ce(net(x), y).item()


def test_the_search_space_and_presets_load(mart):
    import yaml

    from raydistill.config import resolve
    from raydistill.search_space import load

    import raydistill_mart.mart_method

    path = Path(raydistill_mart.mart_method.__file__).parent / MART.search_space  # the YAML beside the module
    doc = yaml.safe_load(path.read_text())
    assert doc["method"] == "mart" and set(doc["params"]) <= {*MART.hparams, "lr", "weight_decay"}
    space = load("mart", path)
    assert set(space.params) == {"beta", "bn_mode", "lr", "weight_decay"}
    cifar = resolve("mart", {"dataset": "cifar10"})
    assert (cifar.epochs, cifar.lr, cifar.lr_milestones, cifar.weight_decay, cifar.hp["beta"]) == (
        120, 0.01, [74, 89, 99], 3.5e-3, 5.0)
    assert (cifar.eps, cifar.step_size) == (8 / 255, 2 / 255)


def test_one_epoch_on_digits_learns(mart, tmp_path):
    """``train mart`` for one epoch of the quickstart preset on digits, in process: well above chance (10%)."""
    from raydistill.errors import cli_entry
    from raydistill.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli_entry(main)(["mart", "--dataset", "digits", "--preset", "quickstart", "--epochs", "1", "--workers", "0",
                             "--tracking-uri", "none", "--test-attacks", "clean,pgd20", "--cpus-per-worker", "1",
                             "--storage-path", str(tmp_path / "runs"), "--summary-json", str(tmp_path / "s.json")])
    finally:
        torch.set_num_threads(threads)
    assert exit_.value.code == 0
    s = json.loads((tmp_path / "s.json").read_text())
    print(s["metrics"], s["val_best_acc"])
    assert s["method"] == "mart" and s["metrics"]["clean_acc"] > 0.3 and s["metrics"]["pgd20_acc"] > 0.1
