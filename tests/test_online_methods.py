"""Online methods: PeerAiD, AT-AKA and CAT-AKA.

* Every loss term and every amalgamation on small fixed tensors equals its equation, computed here
  by hand with numpy (explicit softmax / log formulas), for the authors'-code and paper variants.
* Each network runs once per input, the detached targets get no gradient, the switches work.
* The pareto weights match a brute-force grid search over the simplex (n = 3) and n = 2's closed form.
* (slow) On digits, PeerAiD's student is within 3 points of PGD-AT's PGD-20 accuracy at equal
  epochs (30), and its peer is far more accurate on the student's attacks than on its own.
"""
from __future__ import annotations

import itertools

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from raydistill.config import TrainConfig, build_config
from raydistill.errors import UsageError
from raydistill.losses import ce
from raydistill.methods import HP, Method, NetSpec, Nets, StepContext, get_method
from raydistill.methods.aka import amalgamate, amalgamation_weights, pareto_weights

from conftest import cli, fixed_linear, run_args, summary

# ---------------------------------------------------------------------------- fixed tiny problem
# Linear "networks" on flattened 1x2x2 inputs, 3 classes; a batch of two samples.
W = {"student": [[0.5, -1.0, 0.3, 0.8], [-0.4, 0.9, 1.2, -0.6], [1.1, 0.2, -0.7, 0.4]],
     "peer": [[1.3, -0.2, 0.4, -0.9], [0.1, 1.4, -0.5, 0.6], [-0.8, 0.3, 1.0, 0.2]],
     "net0": [[-0.3, 0.7, 0.9, 0.1], [1.2, -0.6, 0.2, 0.5], [0.4, 0.4, -1.1, 0.9]],
     "net1": [[0.9, 0.1, -0.4, 0.6], [-0.7, 1.1, 0.3, 0.2], [0.2, -0.5, 1.3, -0.1]],
     "net2": [[0.2, 1.0, -0.6, 0.3], [0.6, -0.3, 0.8, -0.9], [-1.0, 0.7, 0.1, 1.2]]}
B = {"student": [0.1, -0.2, 0.05], "peer": [0.0, 0.3, -0.1], "net0": [-0.2, 0.1, 0.2],
     "net1": [0.3, 0.0, -0.3], "net2": [0.05, -0.1, 0.15]}
X = np.array([[0.2, 0.7, 0.4, 0.9], [0.8, 0.1, 0.6, 0.3]])
XA = np.array([[0.3, 0.6, 0.5, 0.8], [0.7, 0.2, 0.5, 0.4]])  # a hand-made "adversarial" batch
XP = np.array([[[0.25, 0.65, 0.45, 0.95], [0.75, 0.15, 0.55, 0.35]],  # three hand-made SVGD particles
               [[0.15, 0.75, 0.35, 0.85], [0.85, 0.05, 0.65, 0.25]],
               [[0.3, 0.8, 0.3, 1.0], [0.9, 0.2, 0.7, 0.2]]])
Y = np.array([0, 2])
C = 3


def logits(net: str, x: np.ndarray) -> np.ndarray:
    return x @ np.array(W[net]).T + np.array(B[net])


def softmax(z: np.ndarray, tau: float = 1.0) -> np.ndarray:
    e = np.exp(z / tau - (z / tau).max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kl_rows(p_logits: np.ndarray, q_logits: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Per-sample KL(p^tau || q^tau) = sum_c p_c (log p_c - log q_c)."""
    p, q = softmax(p_logits, tau), softmax(q_logits, tau)
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def ce_rows(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.log(softmax(z)[np.arange(len(y)), y])


S, SA, PA = logits("student", X), logits("student", XA), logits("peer", XA)
# network i on its own particle i: (3, 2, 3)
ZP = np.stack([logits(f"net{i}", XP[i]) for i in range(3)])
LP = np.stack([ce_rows(z, Y) for z in ZP])  # their CE, (3, 2)


def linear(net: str) -> nn.Module:
    return fixed_linear(W[net], B[net])


class Counter:
    """Counts forward passes per network and records the mode (train / eval) of each."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.n = dict.fromkeys(modules, 0)
        self.modes: dict[str, list[bool]] = {k: [] for k in modules}
        for name, m in modules.items():
            m.register_forward_pre_hook(lambda mod, _, name=name: self.seen(name, mod.training))

    def seen(self, name: str, training: bool) -> None:
        self.n[name] += 1
        self.modes[name].append(training)


def weights_of(name: str) -> str:
    """The fixed weights a network gets: the i-th teacher / student of the AKA methods are net{i}."""
    return "net" + name[-1] if name[-1].isdigit() else name


def setup(name: str, eps: float = 0.1, step_size: float = 0.05, steps: int = 1, **hp):
    cls = get_method(name)
    values = dict(cls.hparams, **hp)
    method = cls(TrainConfig(method=name, student="small_cnn", hp=values))
    specs = method.networks()
    mods = {s.name: linear(weights_of(s.name)) for s in specs}
    ctx = StepContext(eps=eps, step_size=step_size, attack_steps=steps, hp=HP(values))
    return method, Nets(mods, mods, specs), ctx, Counter(mods)


def tensor(a: np.ndarray, **kw) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, **kw).reshape(*a.shape[:-1], 1, 2, 2)


def check(losses: dict, expected: dict, rel: float = 1e-5) -> None:
    assert set(losses) == set(expected)
    for k, v in expected.items():
        assert float(losses[k].detach()) == pytest.approx(v, rel=rel, abs=1e-12), k


# ---------------------------------------------------------------------------- PeerAiD
def peeraid_outer(x=None, **hp):
    method, nets, ctx, count = setup("peeraid", **hp)
    x = tensor(X) if x is None else x
    return method.outer_min(nets, x, torch.tensor(Y), {"x_adv": tensor(XA)}, ctx), count, nets


def test_peeraid_authors_code_defaults():
    """tau 5, tau_p 1, gamma (1, 0.1), lambda (0, 1, 1), KLDivLoss() mean over B*C."""
    losses, count, _ = peeraid_outer()
    check(losses, {"peer_ce": ce_rows(PA, Y).mean(),
                   "peer_kl": 0.1 * kl_rows(SA, PA).mean() / C,
                   "student_ce": 0.0,
                   "student_kl": 25 * kl_rows(PA, SA, 5).mean() / C,
                   "student_self_kl": 25 * kl_rows(S, SA, 5).mean() / C}, rel=1e-3)  # fp32 losses, close S, SA
    assert count.n == {"student": 2, "peer": 1}  # S(x*), S(x), P(x*): once each


def test_peeraid_paper_literal_and_other_weights():
    """Eq. 3-4 with tau_p = tau, batchmean, the student's soft label the peer's constant target; S(x) in the
    lambda3 term stays trained (Eq. 4 makes only the peer's soft label constant)."""
    losses, *_ = peeraid_outer(kl_reduction="batchmean", tau=2.0, tau_p=2.0, gamma1=0.5, gamma2=3.0,
                               lambda1=0.2, lambda2=0.7, lambda3=0.4, detach_student_in_peer_kl=True)
    check(losses, {"peer_ce": 0.5 * ce_rows(PA, Y).mean(),
                   "peer_kl": 3.0 * 4 * kl_rows(SA, PA, 2).mean(),
                   "student_ce": 0.2 * ce_rows(SA, Y).mean(),
                   "student_kl": 0.7 * 4 * kl_rows(PA, SA, 2).mean(),
                   "student_self_kl": 0.4 * 4 * kl_rows(S, SA, 2).mean()}, rel=1e-3)
    assert not get_method("peeraid").hparams["detach_clean_in_self_kl"]  # the default: paper and code alike


@pytest.mark.parametrize("setting", [{}, {"detach_student_in_peer_kl": True, "kl_reduction": "batchmean"}],
                         ids=["authors-code", "paper-literal"])
def test_peeraid_self_kl_trains_the_clean_prediction(setting):
    """The lambda3 term's gradient reaches S(x) with the value its equation gives: for
    L = lambda3 * tau^2 * red_i KL(p_i || q_i), p = softmax(S(x)/tau), q = softmax(S(x*)/tau),
    dL/dS(x)_ic = lambda3 * tau^2 * w * p_ic * (log p_ic - log q_ic - KL_i) / tau (w = 1/B, or 1/(B*C) for mean),
    and through the linear student dL/dx_i = W^T dL/dS(x)_i."""
    x = tensor(X, requires_grad=True)
    losses, _, nets = peeraid_outer(x=x, **setting)
    (gx,) = torch.autograd.grad(losses["student_self_kl"], x)
    tau, lam3 = 5.0, 1.0
    w = 1 / len(X) / (C if setting.get("kl_reduction", "mean") == "mean" else 1)
    p, q = softmax(S, tau), softmax(SA, tau)
    kl_i = (p * (np.log(p) - np.log(q))).sum(axis=1, keepdims=True)
    d_logits = lam3 * tau ** 2 * w * p * (np.log(p) - np.log(q) - kl_i) / tau
    expected = d_logits @ np.array(W["student"])
    assert np.allclose(gx.reshape(2, 4).numpy(), expected, rtol=1e-4, atol=1e-7)
    assert np.abs(expected).max() > 1e-3  # a gradient the check can see


@pytest.mark.parametrize("detach", [False, True])
def test_peeraid_detach_switches(detach):
    """The peer's KL trains the student too (code) unless detached (Eq. 3 read as the peer's own loss);
    detach_clean_in_self_kl=true (an ablation: neither paper nor code) makes S(x) a constant in the lambda3
    term; the peer's soft label is always a constant in the student's terms."""
    x = tensor(X, requires_grad=True)
    losses, _, nets = peeraid_outer(x=x, detach_student_in_peer_kl=detach, detach_clean_in_self_kl=detach)
    student, peer = list(nets._module("student").parameters()), list(nets._module("peer").parameters())
    grads = torch.autograd.grad(losses["peer_kl"], student, allow_unused=True, retain_graph=True)
    assert all((g is None) == detach for g in grads)
    (gx,) = torch.autograd.grad(losses["student_self_kl"], x, allow_unused=True, retain_graph=True)
    assert (gx is None) == detach
    assert all(g is None for g in torch.autograd.grad(losses["student_kl"], peer, allow_unused=True))


def test_peeraid_inner_max():
    """Target P(x) from the peer in eval() (one forward, no graph); the student attacked in bn_mode."""
    method, nets, ctx, count = setup("peeraid", steps=2)
    for m in nets._module("student"), nets._module("peer"):
        m.train()
    x_adv = method.inner_max(nets, tensor(X), torch.tensor(Y), ctx)["x_adv"]
    assert count.modes == {"peer": [False], "student": [False, False]}
    assert nets._module("student").training and nets._module("peer").training
    assert (x_adv - tensor(X)).abs().max() <= ctx.eps + 1e-12 and not x_adv.requires_grad
    method.inner_max(nets, tensor(X), torch.tensor(Y), setup("peeraid", bn_mode="train")[2])
    assert count.modes["student"][-1] is True and count.modes["peer"][-1] is False


def test_peeraid_diagnostics():
    """With eps = 0 both attacks return x: the peer's clean accuracy; otherwise per-sample 0/1 values."""
    method, nets, ctx, _ = setup("peeraid", eps=0.0)
    out = method.diagnostics(nets, tensor(X), torch.tensor(Y), ctx)
    clean = (logits("peer", X).argmax(axis=1) == Y).astype(float).tolist()
    assert out["peer_acc_on_student_adv"].tolist() == clean == out["peer_acc_on_own_adv"].tolist()
    method, nets, ctx, _ = setup("peeraid", eps=0.5, step_size=0.2, steps=3)
    out = method.diagnostics(nets, tensor(X), torch.tensor(Y), ctx)
    assert out["peer_acc_on_own_adv"].tolist() == [0.0, 0.0]  # a linear peer at eps 0.5 falls to its own PGD


class BareOutsideAttack(Method):
    """A method that (wrongly) trains through the bare module instead of the wrapped forward."""

    def outer_min(self, nets, x, y, adv, ctx):
        return {"ce": ce(nets.raw("student")(x), y)}


def test_bare_modules_only_inside_attacking():
    """Methods train through the wrapped networks; the bare modules come only from attacking()."""
    specs = [NetSpec("student", "small_cnn"), NetSpec("peer", "small_cnn")]
    bare = {n: linear(n) for n in ("student", "peer")}
    wrapped = {n: nn.Sequential(m) for n, m in bare.items()}  # stands for the DDP wrapper
    nets = Nets(wrapped, bare, specs)
    assert nets.student is wrapped["student"] and nets.peer is wrapped["peer"]
    method = BareOutsideAttack(TrainConfig(method="natural", student="small_cnn"))
    with pytest.raises(AttributeError, match=r"nets.raw is not for methods: .*Method.attacking"):
        method.outer_min(nets, tensor(X), torch.tensor(Y), {}, StepContext(0.1, 0.05, 1, HP({})))
    for m in bare.values():
        m.train()
    with method.attacking(nets, ["peer", "student"], "eval") as (p, s):
        assert p is bare["peer"] and s is bare["student"] and not (p.training or s.training)
    assert bare["peer"].training and bare["student"].training


def test_peeraid_networks():
    specs = get_method("peeraid")(TrainConfig(method="peeraid", student="small_cnn")).networks()
    assert [(s.name, s.arch, s.trainable) for s in specs] == [("student", "small_cnn", True),
                                                              ("peer", "small_cnn", True)]
    specs = get_method("peeraid")(TrainConfig(method="peeraid", student="resnet18", peer="wrn34_10")).networks()
    assert specs[1].arch == "wrn34_10"


# ---------------------------------------------------------------------------- amalgamation ψ
def test_amalgamation_weights_by_hand():
    ell = LP
    naive = np.zeros_like(ell)
    naive[ell.argmax(axis=0), np.arange(2)] = 1.0
    soft = np.exp(2.0 * ell) / np.exp(2.0 * ell).sum(axis=0)
    for rule, expected in (("naive", naive), ("linear", ell / ell.sum(axis=0)), ("soft", soft)):
        got = amalgamation_weights(torch.tensor(ell), rule, beta=2.0)
        assert np.allclose(got.numpy(), expected), rule
    for rule, lam in (("naive", naive), ("linear", ell / ell.sum(axis=0)), ("soft", np.exp(ell) / np.exp(ell).sum(0))):
        z = amalgamate(torch.tensor(ZP), torch.tensor(Y), rule)  # beta = 1, CE from the logits themselves
        assert np.allclose(z.numpy(), (lam[:, :, None] * ZP).sum(axis=0), rtol=1e-6), rule
    assert torch.allclose(amalgamation_weights(torch.zeros(3, 2), "linear"), torch.full((3, 2), 1 / 3))  # all CE 0


def grid_min(p_s: np.ndarray, p_t: np.ndarray, steps: int) -> float:
    """Brute force: min over the simplex grid {λ = (a, b, steps - a - b) / steps} of ||p_s - Σ λ_i p_t[i]||²."""
    a, b = np.meshgrid(np.arange(steps + 1), np.arange(steps + 1))
    keep = a + b <= steps
    lam = np.stack([a[keep], b[keep], steps - a[keep] - b[keep]], axis=1) / steps  # (M, 3)
    return float(((p_s - lam @ p_t) ** 2).sum(axis=1).min())


def objective(p_s: np.ndarray, p_t: np.ndarray, lam: np.ndarray) -> float:
    return float(((p_s - (lam[:, None] * p_t).sum(axis=0)) ** 2).sum())


def test_pareto_weights_match_a_grid_search():
    rng = np.random.default_rng(0)
    p_t = softmax(rng.normal(size=(3, 6, 5)) * 2)
    p_s = softmax(rng.normal(size=(6, 5)) * 2)
    p_s[0] = 0.2 * p_t[0, 0] + 0.5 * p_t[1, 0] + 0.3 * p_t[2, 0]  # inside the hull: λ* = (0.2, 0.5, 0.3)
    p_s[1] = p_t[2, 1]  # a vertex
    lam = pareto_weights(torch.tensor(p_s), torch.tensor(p_t)).double().numpy()
    assert lam.shape == (3, 6) and (lam >= 0).all() and np.allclose(lam.sum(axis=0), 1.0)
    assert np.allclose(lam[:, 0], [0.2, 0.5, 0.3], atol=1e-3) and np.allclose(lam[:, 1], [0, 0, 1], atol=1e-3)
    for b in range(6):
        best = grid_min(p_s[b], p_t[:, b], 400)
        assert objective(p_s[b], p_t[:, b], lam[:, b]) <= best + 1e-6, b


def test_pareto_weights_two_networks_closed_form():
    rng = np.random.default_rng(1)
    p_t = softmax(rng.normal(size=(2, 8, 4)) * 2)
    p_s = softmax(rng.normal(size=(8, 4)) * 2)
    lam = pareto_weights(torch.tensor(p_s), torch.tensor(p_t)).double().numpy()
    grid = np.linspace(0, 1, 100001)
    for b in range(8):
        f = [((p_s[b] - a * p_t[0, b] - (1 - a) * p_t[1, b]) ** 2).sum() for a in grid[::100]]
        a0 = grid[::100][int(np.argmin(f))]  # coarse, then fine around it
        fine = grid[(grid >= a0 - 1e-3) & (grid <= a0 + 1e-3)]
        f = [((p_s[b] - a * p_t[0, b] - (1 - a) * p_t[1, b]) ** 2).sum() for a in fine]
        assert lam[0, b] == pytest.approx(fine[int(np.argmin(f))], abs=2e-5)
        assert lam[1, b] == pytest.approx(1 - lam[0, b])


# ---------------------------------------------------------------------------- AT-AKA / CAT-AKA losses
def aka_outer(name: str, **hp):
    method, nets, ctx, count = setup(name, **hp)
    losses = method.outer_min(nets, tensor(X), torch.tensor(Y), {"x_particles": tensor(XP)}, ctx)
    return losses, count, nets


def psi(rule: str, beta: float = 1.0) -> np.ndarray:
    """ψ of the networks' own-particle logits ZP by hand (Eq. 4-6)."""
    if rule == "naive":
        return ZP[LP.argmax(axis=0), np.arange(2)]
    lam = LP / LP.sum(axis=0) if rule == "linear" else np.exp(beta * LP) / np.exp(beta * LP).sum(axis=0)
    return (lam[:, :, None] * ZP).sum(axis=0)


@pytest.mark.parametrize("rule", ["naive", "linear", "soft"])
def test_at_aka_logit_amalgamations(rule):
    """Teachers: CE on their own particle; student on clean x: (1-α)CE + α||z_S - ψ(z_T)||², mean over B*C."""
    losses, count, _ = aka_outer("at_aka", amalgamation=rule, alpha=0.3, beta=0.5)
    check(losses, {"teacher_ce": LP.sum(axis=0).mean(), "ce": 0.7 * ce_rows(S, Y).mean(),
                   "mse": 0.3 * ((S - psi(rule, 0.5)) ** 2).sum(axis=1).mean() / C})
    assert count.n == {"student": 1, "teacher0": 1, "teacher1": 1, "teacher2": 1}


def test_at_aka_mse_summed_over_classes():
    losses, *_ = aka_outer("at_aka", alpha=0.3, mse_reduction="batchmean")
    assert float(losses["mse"].detach()) == pytest.approx(0.3 * ((S - psi("soft")) ** 2).sum(axis=1).mean(), rel=1e-5)


def simplex_lstsq(p_s: np.ndarray, p_t: np.ndarray) -> np.ndarray:
    """Exact argmin over the simplex of ||p_s - Σ λ_i p_t[i]||²: the KKT system on every support, best feasible."""
    n, best, arg = len(p_t), np.inf, None
    for k in range(1, n + 1):
        for support in itertools.combinations(range(n), k):
            P = p_t[list(support)]
            kkt = np.block([[2 * P @ P.T, np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
            sol = np.linalg.lstsq(kkt, np.concatenate([2 * P @ p_s, [1.0]]), rcond=None)[0][:k]
            lam = np.zeros(n)
            lam[list(support)] = sol
            if (sol >= -1e-12).all() and objective(p_s, p_t, lam) < best:
                best, arg = objective(p_s, p_t, lam), lam
    return arg


def test_at_aka_pareto():
    """λ* of Eq. 7 (exact, by hand); p_T = Σ λ*_i p_Ti; loss (1-α)CE + α KL(p_T || p_S), batch mean (Eq. 8)."""
    losses, *_ = aka_outer("at_aka", amalgamation="pareto", alpha=0.6)
    p_s, p_t = softmax(S), softmax(ZP)
    kls = []
    for b in range(2):
        lam = simplex_lstsq(p_s[b], p_t[:, b])
        target = (lam[:, None] * p_t[:, b]).sum(axis=0)
        kls.append((target * (np.log(target) - np.log(p_s[b]))).sum())
    check(losses, {"teacher_ce": LP.sum(axis=0).mean(), "ce": 0.4 * ce_rows(S, Y).mean(), "kl": 0.6 * np.mean(kls)},
          rel=1e-3)


@pytest.mark.parametrize("rule", ["naive", "linear", "soft", "pareto"])
def test_at_aka_gradients(rule):
    """Each teacher learns from its CE only; the amalgamated target is a constant for the student."""
    losses, _, nets = aka_outer("at_aka", amalgamation=rule)
    distill = losses["kl" if rule == "pareto" else "mse"]
    for i in range(3):
        teacher = list(nets._module(f"teacher{i}").parameters())
        assert all(g is None for g in torch.autograd.grad(distill, teacher, allow_unused=True, retain_graph=True))
        assert all(g is not None for g in torch.autograd.grad(losses["teacher_ce"], teacher, retain_graph=True))
    assert all(g is None for g in torch.autograd.grad(losses["teacher_ce"], list(nets._module("student").parameters()),
                                                      allow_unused=True))


@pytest.mark.parametrize("rule", ["naive", "linear", "soft"])
def test_cat_aka_losses(rule):
    """Σ_i (1-α) CE(p_Si(x'_i), y) + α ||z_Si - ψ(z_S)||² / C, ψ of the students' own-particle logits."""
    losses, count, nets = aka_outer("cat_aka", amalgamation=rule, alpha=0.25)
    z_s = psi(rule)
    check(losses, {"ce": 0.75 * LP.mean(axis=1).sum(),
                   "mse": 0.25 * sum(((ZP[i] - z_s) ** 2).sum(axis=1).mean() for i in range(3)) / C})
    assert count.n == {"student0": 1, "student1": 1, "student2": 1}
    # z_S is a constant: student i's distillation gradient is that of α||z_Si - z_S||² alone
    lin = nets._module("student1")[1]
    (g,) = torch.autograd.grad(losses["mse"], lin.bias)
    assert np.allclose(g.numpy(), 0.25 * (2 * (ZP[1] - z_s)).mean(axis=0) / C)


def test_aka_networks_and_sizes():
    cfg = TrainConfig(method="at_aka", student="mobilenet_v2", peer="resnet18", hp={"n_teachers": 2})
    assert [(s.name, s.arch) for s in get_method("at_aka")(cfg).networks()] == [
        ("student", "mobilenet_v2"), ("teacher0", "resnet18"), ("teacher1", "resnet18")]
    cfg = TrainConfig(method="at_aka", student="small_cnn", hp={"n_teachers": 3})
    assert {s.arch for s in get_method("at_aka")(cfg).networks()} == {"small_cnn"}
    cfg = TrainConfig(method="cat_aka", student="resnet18", hp={"n_students": 4})
    assert [(s.name, s.arch, s.trainable) for s in get_method("cat_aka")(cfg).networks()] == [
        (f"student{i}", "resnet18", True) for i in range(4)]


def test_aka_config_errors():
    from raydistill.train import parser

    for name, size in (("at_aka", "n_teachers"), ("cat_aka", "n_students")):
        with pytest.raises(UsageError, match=size):
            build_config(name, parser().parse_args([name, "--set", f"{size}=0"]))
    with pytest.raises(UsageError, match="amalgamation"):
        build_config("cat_aka", parser().parse_args(["cat_aka", "--set", "amalgamation=pareto"]))
    cfg = build_config("at_aka", parser().parse_args(["at_aka", "--set", "amalgamation=pareto"]))
    assert cfg.hp["amalgamation"] == "pareto"


@pytest.mark.parametrize("name", ["at_aka", "cat_aka"])
def test_aka_inner_max_and_diagnostics(name):
    method, nets, ctx, count = setup(name, svgd_steps=3, eps=0.1, step_size=0.02)
    for n in nets.names():
        nets._module(n).train()
    xs = method.inner_max(nets, tensor(X), torch.tensor(Y), ctx)["x_particles"]
    assert xs.shape == (3, 2, 1, 2, 2) and not xs.requires_grad
    assert (xs - tensor(X)).abs().max() <= 0.1 + 1e-12 and xs.min() >= 0 and xs.max() <= 1
    members = [n for n in nets.names() if n != "student"]
    assert all(count.n[m] == 3 and count.modes[m] == [False] * 3 for m in members)  # own target: one pass each
    assert all(nets._module(n).training for n in nets.names())
    out = method.diagnostics(nets, tensor(X), torch.tensor(Y), ctx)
    assert set(out) == {f"{a}_{b}" for a in ("svgd", "pgd") for b in ("pairwise_linf", "pairwise_l2", "particle_loss")}
    assert all(v.shape == (2,) for v in out.values())
    assert all(0 <= float(v) <= 0.2 + 1e-9 for k in ("svgd_pairwise_linf", "pgd_pairwise_linf") for v in out[k])


def test_aka_ensemble_target_scores_each_particle_by_every_network():
    method, nets, *_ = setup("at_aka", svgd_target="ensemble")
    models = [nets._module(f"teacher{i}") for i in range(3)]
    got = method.particle_losses(models, torch.tensor(Y), "ensemble")(tensor(XP)).detach()
    expected = np.mean([[ce_rows(logits(f"net{i}", XP[j]), Y) for j in range(3)] for i in range(3)], axis=0)
    assert np.allclose(got.numpy(), expected)
    got = method.particle_losses(models, torch.tensor(Y), "own")(tensor(XP)).detach()
    assert np.allclose(got.numpy(), LP)


@pytest.mark.parametrize("name,dataset,expected", [
    ("peeraid", "cifar10", dict(epochs=300, lr_milestones=[215, 260, 285], weight_decay=2e-4, swa_start=215,
                                tau=5.0, tau_p=1.0, gamma1=1.0, gamma2=0.1, lambda1=0.0, lambda2=1.0, lambda3=1.0,
                                kl_reduction="mean", detach_student_in_peer_kl=False)),
    ("peeraid", "cifar100", dict(epochs=300, swa_start=215, gamma2=1.0, tau=5.0)),
    ("peeraid", "tinyimagenet", dict(swa_start=100, tau=1.0, tau_p=1.0, gamma2=100.0, lambda1=0.035, lambda2=35.0,
                                     lambda3=20.0)),
    ("peeraid", "digits", dict(swa_start=10, lambda1=1.0, tau=1.0, tau_p=1.0, gamma2=0.1)),  # SWA from the first decay
    ("at_aka", "cifar10", dict(epochs=300, lr_milestones=[200, 250, 270], weight_decay=2e-4, n_teachers=3,
                               svgd_step=0.003, svgd_steps=20, beta=1.0)),
    # CAT-AKA: Appendix A's setup for Table 4 (tests/test_presets.py pins it to the quote), ResNet-18's by default
    ("cat_aka", "cifar100", dict(epochs=120, lr_milestones=[75, 90, 100], lr=0.01, weight_decay=3.5e-3, n_students=3,
                                 svgd_step=0.003, svgd_steps=20)),
])
def test_paper_presets(name, dataset, expected):
    from raydistill.train import parser

    cfg = build_config(name, parser().parse_args([name, "--dataset", dataset]))
    for k, v in expected.items():
        assert (cfg.hp[k] if k in cfg.hp else getattr(cfg, k)) == v, k


# ---------------------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
def test_peeraid_stays_close_to_pgd_at_on_digits(workdir):
    """Issue 5: PeerAiD's student within 3 points of PGD-AT's test PGD-20 accuracy at equal epochs.
    Equal schedules: 30 epochs, decays at 22 and 27, each method with its digits defaults (PeerAiD's
    digits preset: λ1 = 1, τ = τp = 1; the authors' CIFAR λ1 = 0 ends ~15 points behind on schedules
    this short). Test PGD-20 at eps 0.1 (449 images), in-process; this test runs seed 0. The figures
    depend on the CPU (same code and seeds; the Intel rows are from earlier sessions):

    machine (schedule)                            pgd_at                 peeraid (digits preset)  mean gap
    Intel Xeon with AMX (10 epochs, decays 7, 9)    0.826 / 0.844 / 0.831  0.786 / 0.829 / 0.804    -2.8 points
    Intel Xeon with AMX (15 epochs, decays 10, 13)  0.866 / 0.853 / 0.880  0.804 / 0.851 / 0.844    -3.3 points
    Intel Xeon with AMX (20 epochs, decays 15, 18)  0.878 / 0.869 / 0.875  0.860 / 0.855 / 0.857    -1.6 points
    AMD EPYC (20 epochs, decays 15, 18)             0.878 / 0.878 / 0.880  0.817 / 0.840 / 0.866    -3.7 points
    AMD EPYC (30 epochs, decays 22, 27), seeds 0-5  0.884 / 0.873 / 0.882  0.869 / 0.873 / 0.864    -1.3 points
                                                    0.889 / 0.882 / 0.889  0.869 / 0.884 / 0.860    (-2.9 to +0.2)
    AMD EPYC (40 epochs, decays 30, 36)             0.882 / 0.900 / 0.884  0.862 / 0.884 / 0.873    -1.6 points

    At 20 epochs the gap ranged from -1.3 to -6.0 points per seed: the peer needs the longer schedule to
    become a good tutor. At 30 epochs every seed is within 3 points (seed 0: -1.6). The peer is far more
    accurate on the student's attacks than on its own (the paper's Fig. 1 / Table 2)."""
    common = ["--dataset", "digits", "--workers", "0", "--epochs", "30", "--lr-milestones", "22,27",
              "--test-attacks", "clean,pgd20"]
    for method in ("pgd_at", "peeraid"):
        proc = cli("train", method, *common, *run_args(workdir, method), timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    base, peer = summary(workdir, "pgd_at"), summary(workdir, "peeraid")
    print(f"digits, 30 epochs: pgd_at {base['metrics']}  peeraid {peer['metrics']}")
    assert peer["metrics"]["pgd20_acc"] >= base["metrics"]["pgd20_acc"] - 0.03, (peer["metrics"], base["metrics"])
    assert 0.5 < peer["metrics"]["swa_pgd20_acc"] <= 1.0  # the averaged student (SWA from epoch 22) is tested too
    client = mlflow.tracking.MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    history = lambda key: [m.value for m in sorted(client.get_metric_history(peer["mlflow_run_id"], key),
                                                   key=lambda m: m.step)]
    on_student, on_own = history("val/peer_acc_on_student_adv"), history("val/peer_acc_on_own_adv")
    assert len(on_student) == len(on_own) == 30
    assert np.mean(on_student[-5:]) > np.mean(on_own[-5:]) + 0.15, (on_student, on_own)
