"""SVGD as an attack (raydistill.svgd).

* The Stein direction equals its formula, computed by hand with explicit loops; the median
  bandwidth puts k = 1/n at the median distance.
* Particles stay in the eps-ball and in [0, 1], whatever the repulsion.
* With the paper's sigma = 1e-3 the kernel vanishes on images and SVGD is exactly n PGD runs.
* On a small trained model, SVGD particles spread more than PGD runs from random starts
  (AT-AKA Table 1), in L-inf and in L2.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydistill import attacks
from raydistill.data import load_dataset
from raydistill.models import build_model
from raydistill.svgd import median_bandwidth, pairwise_distance, stein_direction, svgd


def test_stein_direction_by_hand():
    rng = np.random.default_rng(0)
    n, b, d, sigma, gamma = 3, 2, 5, 0.7, 1.5
    xs, g = rng.uniform(size=(n, b, d)), rng.normal(size=(n, b, d))
    got = stein_direction(torch.tensor(xs), torch.tensor(g), sigma, gamma).numpy()
    for s in range(b):
        for i in range(n):
            phi = np.zeros(d)
            for j in range(n):
                k = math.exp(-((xs[j, s] - xs[i, s]) ** 2).sum() / (2 * sigma ** 2))
                grad_k = -(xs[j, s] - xs[i, s]) / sigma ** 2 * k  # ∇_{x_j} k(x_j, x_i)
                phi += k * g[j, s] + gamma / n * grad_k
            assert np.allclose(got[i, s], phi, rtol=1e-5, atol=1e-6), (i, s)


def test_median_bandwidth_gives_one_over_n_at_the_median_distance():
    pts = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.0, 1.0]]])  # squared distances 9, 1, 10: median 9
    sq = torch.cdist(pts, pts).square()
    h = median_bandwidth(sq)
    assert float(h) == pytest.approx(9 / math.log(3))
    assert float(torch.exp(-sq[0, 0, 1] / h)) == pytest.approx(1 / 3)
    assert float(median_bandwidth(torch.zeros(4, 1, 1))[0]) == 1.0  # one particle: no pairs


def test_pairwise_distance():
    xs = torch.tensor([[[0.0, 0.0]], [[0.1, -0.3]], [[0.2, 0.1]]])  # n = 3, B = 1, D = 2
    assert pairwise_distance(xs).tolist() == pytest.approx([(0.3 + 0.2 + 0.4) / 3])
    assert pairwise_distance(xs, 2).tolist() == pytest.approx([(0.1 ** 0.5 + 0.05 ** 0.5 + 0.17 ** 0.5) / 3])
    assert pairwise_distance(xs[:1]).tolist() == [0.0]


def linear_objective(n: int, y: torch.Tensor):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 4)
    return lambda xs: F.cross_entropy(lin(xs.flatten(2).flatten(0, 1)), y.repeat(n), reduction="none").view(n, -1)


@pytest.mark.parametrize("sigma,gamma", [(None, 1.0), (None, 100.0), (1e-3, 1.0), (10.0, 5.0)])
def test_particles_stay_in_the_ball_and_the_image_range(sigma, gamma):
    x = torch.rand(8, 1, 4, 4)
    x[0], x[1, 0, 0] = 0.0, 1.0  # pixels on both edges of [0, 1]
    y = torch.randint(0, 4, (8,))
    xs = svgd(linear_objective(4, y), x, n=4, eps=0.1, step_size=0.03, steps=10, sigma=sigma, gamma=gamma)
    assert xs.shape == (4, 8, 1, 4, 4) and not xs.requires_grad
    assert (xs - x).abs().max() <= 0.1 + 1e-6 and xs.min() >= 0 and xs.max() <= 1


def test_the_papers_sigma_degenerates_to_pgd_runs():
    """σ = 1e-3: k(x_j, x_i) = 0 for j ≠ i, ∇k(x_i, x_i) = 0, so φ_i = ∇L(x_i): n independent PGD runs."""
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 4, (6,))
    objective = linear_objective(3, y)
    got = svgd(objective, x, n=3, eps=0.1, step_size=0.02, steps=5, sigma=1e-3,
               generator=torch.Generator().manual_seed(1))
    pgd = attacks.pgd(objective, x.expand(3, *x.shape), eps=0.1, step_size=0.02, steps=5,
                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, pgd)


@pytest.fixture
def one_thread():
    """Tiny convolutions: one thread is faster, and far faster on a shared, oversubscribed CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_svgd_spreads_more_than_pgd_restarts_on_a_trained_model(one_thread):
    """AT-AKA Table 1 on digits: 3 particles vs 3 PGD runs, same model, loss, step and iterations."""
    torch.manual_seed(0)
    data = load_dataset("digits", data_dir=None, download=False, val_size=0)
    model = build_model("small_cnn", 10, (1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = data.train_x.float(), data.train_y
    for _ in range(2):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    x, y = data.test_x[:64].float(), data.test_y[:64]
    assert (model(x).argmax(1) == y).float().mean() > 0.8
    n = 3
    objective = lambda xs: F.cross_entropy(model(xs.flatten(0, 1)), y.repeat(n), reduction="none").view(n, -1)
    kw = dict(eps=0.1, step_size=0.025, steps=10)
    xs = svgd(objective, x, n=n, **kw)
    xp = attacks.pgd(objective, x.expand(n, *x.shape), **kw)
    assert pairwise_distance(xs).mean() > pairwise_distance(xp).mean() + 0.02
    assert pairwise_distance(xs, 2).mean() > 1.5 * pairwise_distance(xp, 2).mean()
    with torch.no_grad():
        assert objective(xs).mean() > 0.7 * objective(xp).mean()  # still strong attacks
