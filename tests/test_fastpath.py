"""The speed features of raydistill.fastpath leave the mathematics unchanged.

* BatchNorm folding: the folded copy of every zoo architecture computes the eval-mode network's
  logits (to ~1e-5), follows weight updates and gives the same PGD examples (up to sign flips of
  gradients that are ~0); pre-activation blocks (BN before the conv) are left unfolded.
* attack_views: folded copy in eval mode, the network itself (parameters frozen for the duration)
  in train mode; unprepared networks pass through; copies of a prepared network are independent.
* One training step with the strict features (fold, input gradients only, channels_last) equals
  the plain fp32 step; teachers are folded once when loaded.
* (slow) PGD-20 accuracy of a fixed, adversarially trained model differs by at most 0.5 points
  between fp32 and the fast path (bf16 autocast with fp32 losses, channels_last, folded BN).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydistill import attacks, fastpath
from raydistill.fastpath import FastPath, FoldedCopy, conv_bn_pairs
from raydistill.models import WideResNet, build_model

SMALL = (3, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: see conftest


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm statistics and affine parameters."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, *SMALL) * 2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


ZOO = {"resnet18": 20, "preact_resnet18": 8, "mobilenet_v2": 57, "vgg16": 13, "small_cnn": 4, "wrn16_2": 7}


def zoo_model(arch: str) -> nn.Module:
    return WideResNet(16, 2, 10) if arch == "wrn16_2" else build_model(arch, 10, SMALL)


@pytest.mark.parametrize("arch", ZOO)
def test_folded_copy_computes_the_eval_mode_network(arch):
    model = randomised(zoo_model(arch))
    folded = FoldedCopy(model)
    assert len(folded.pairs) == ZOO[arch]  # pre-activation nets fold only their conv -> bn pairs
    module = folded.refresh()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()) or arch in ("preact_resnet18", "wrn16_2")
    assert not any(p.requires_grad for p in module.parameters()) and not module.training
    x = torch.rand(4, *SMALL)
    with torch.no_grad():
        ref, out = model(x), module(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_pairs_skip_a_conv_whose_output_is_used_twice():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.conv2, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.conv(x)
            return self.bn(h) + h + self.bn2(self.conv2(h))

    assert conv_bn_pairs(Branchy()) == [("conv2", "bn2")]


def test_folded_copy_follows_weight_updates_and_gives_the_same_pgd_examples():
    model = randomised(build_model("small_cnn", 10, SMALL))
    folded = FoldedCopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(torch.rand(8, *SMALL)).square().mean().backward()  # also moves the running statistics
    opt.step()
    model.eval()
    module = folded.refresh()
    x, y = torch.rand(64, *SMALL), torch.randint(0, 10, (64,))
    with torch.no_grad():
        assert torch.allclose(module(x), model(x), rtol=1e-5, atol=1e-5)
    for steps, same_pixels in ((1, 0.9999), (10, 0.99)):  # a sign may flip where a gradient is ~0 (rounding)
        kw = dict(eps=8 / 255, step_size=2 / 255, steps=steps)
        ref = attacks.pgd_attack(model, x, y, generator=torch.Generator().manual_seed(1), **kw)
        out = attacks.pgd_attack(module, x, y, generator=torch.Generator().manual_seed(1), **kw)
        assert (out == ref).float().mean() >= same_pixels
        with torch.no_grad():
            z_ref, z_out = model(ref), model(out)
        assert (z_ref.argmax(1) == z_out.argmax(1)).float().mean() >= 0.98
        assert F.cross_entropy(z_out, y).item() == pytest.approx(F.cross_entropy(z_ref, y).item(), rel=1e-3)


def test_prepare_and_attack_views():
    cfg = FastPath(channels_last=True, fold_bn=True, input_grads_only=True)
    model = fastpath.prepare(build_model("small_cnn", 10, SMALL), cfg)
    conv = model.features[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    plain = build_model("small_cnn", 10, SMALL)
    with fastpath.attack_views([model, plain], "eval") as (view, same):
        assert view is not model and same is plain and not model.training and not plain.training
        assert isinstance(view.features[0][1], nn.Identity)
        assert view.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.training and plain.training  # modes restored
    with fastpath.attack_views([model], "train") as (view,):
        assert view is model and model.training and not any(p.requires_grad for p in model.parameters())
        x = torch.rand(2, *SMALL, requires_grad=True)
        torch.autograd.grad(model(x).sum(), x)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert fastpath.views_of(model) and not fastpath.views_of(plain)
    assert fastpath.inference_view(plain) is plain and fastpath.inference_view(model) is fastpath.views_of(model)[0]


def test_copies_of_a_prepared_network_are_independent():
    model = randomised(fastpath.prepare(build_model("small_cnn", 10, SMALL), FastPath(fold_bn=True)))
    x = torch.rand(4, *SMALL)
    with torch.no_grad():
        before = fastpath.inference_view(model)(x)
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p.add_(0.1)
        assert torch.allclose(fastpath.inference_view(twin)(x), twin(x), atol=1e-5)
        assert torch.equal(fastpath.inference_view(model)(x), before)
    assert fastpath.views_of(twin)[0] is not fastpath.views_of(model)[0]


def test_a_frozen_teacher_is_folded_once():
    teacher = randomised(build_model("resnet18", 10, SMALL)).requires_grad_(False)
    x = torch.rand(4, *SMALL)
    with torch.no_grad():
        ref = teacher(x)
    folded = fastpath.prepare(teacher, FastPath(fold_bn=True, channels_last=True), frozen=True)
    assert folded is not teacher and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), ref, rtol=1e-5, atol=1e-5)
    assert fastpath.prepare(teacher, FastPath()) is teacher  # nothing switched on: untouched


def test_the_strict_features_keep_the_training_step(tmp_path):
    """One PeerAiD step (ResNet-18 student and peer) with fold_bn + input_grads_only + channels_last
    (fp32) makes the plain step's update up to float rounding: folding changes the last bits of the
    attack's gradients, which can flip the sign of a few PGD steps' near-zero components. Measured:
    the updates differ by 0.4 % (student) and 0.05 % (peer) of their norm; a wrong feature (e.g. the
    attack on train-mode BatchNorm, or weights not refreshed) changes them by far more."""
    from raydistill.bench.cli import parse
    from raydistill.bench.configs import Bench
    from raydistill.bench.races import FAST

    args = parse(["--student", "resnet18", "--image-size", "16", "--batch-size", "8", "--steps", "1",
                  "--attack-steps", "3", "--eval-examples", "8", "--threads", "1"])
    b = Bench(args, str(tmp_path))
    def flat(runner, n):
        return torch.cat([p.detach().flatten().clone() for p in runner.network(n).parameters()])

    updates, starts = [], []
    for features in ({}, FAST):
        runner = b.runner(b.config("peeraid", **features))
        before = {n: flat(runner, n) for n in ("student", "peer")}
        starts.append(before)
        x, y = next(runner.batches())
        torch.manual_seed(0)
        runner.step(x, y)
        updates.append({n: flat(runner, n) - before[n] for n in ("student", "peer")})
    assert fastpath.views_of(runner.network("student"))  # the attack ran on the folded copy
    for n in ("student", "peer"):
        assert torch.equal(starts[0][n], starts[1][n]), n  # the same initial weights
        plain, fast = updates[0][n], updates[1][n]
        assert plain.norm() > 0 and (plain - fast).norm() <= 0.02 * plain.norm(), n


@pytest.mark.slow
def test_fast_path_pgd20_accuracy_of_a_fixed_model_within_half_a_point(tmp_path):
    """A PGD-AT small CNN on digits; PGD-20 on all 1797 digits, fp32 vs bf16 + channels_last + folded BN."""
    from raydistill.config import Placement, TrainConfig
    from raydistill.data import load_dataset
    from raydistill.engine import LocalSession, Trainer
    from raydistill.evaluation import evaluate
    from raydistill.methods import get_method

    cfg = TrainConfig(method="pgd_at", dataset="digits", student="small_cnn", epochs=6, batch_size=64, lr=0.05,
                      eps=0.1, step_size=0.025, placement=Placement(threads=1), hp=dict(get_method("pgd_at").hparams))
    trainer = Trainer(cfg, LocalSession(str(tmp_path)))
    trainer.setup()
    for epoch in range(cfg.epochs):
        trainer.train_epoch(epoch)
    model = trainer.nets._module("student").eval()
    d = load_dataset("digits", val_size=0)
    x, y = torch.cat([d.train_x, d.test_x]), torch.cat([d.train_y, d.test_y])
    kw = dict(eps=cfg.eps, step_size=cfg.step_size, batch_size=512)
    fp32 = evaluate(model, x, y, ["clean", "pgd20"], **kw)
    fast_model = fastpath.prepare(copy.deepcopy(model), FastPath(channels_last=True, fold_bn=True))
    with fastpath.autocast("cpu", "bf16"):
        fast = evaluate(fastpath.inference_view(fast_model), x, y, ["clean", "pgd20"], **kw)
    assert 0.2 < fp32["pgd20_acc"] < fp32["clean_acc"] - 0.05, fp32  # a robust, attackable model
    assert abs(fast["pgd20_acc"] - fp32["pgd20_acc"]) <= 0.005, (fp32, fast)
