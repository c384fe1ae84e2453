"""The study's cost model: estimated device-hours of each run, from counted work and one stated throughput.

    device-seconds = FLOPs of the run / (reference TFLOP/s x 1e12) + a fixed overhead per run

FLOPs of a training run = epochs x [training images x sum over the method's networks of
(forwards + backward_factor x backwards) per image x GFLOPs of one forward of that network
+ validation images x (clean + PGD-10 of the student)] + the final test attacks on the test split.

* Passes per image of one training step: :data:`PASSES` (the method's attack steps included, the
  teachers' forwards included; IAD / AdaIAD after their warm-up), as counted by ``raydistill.bench``
  (BENCHMARKS.md, "Passes per training step").
* GFLOPs of one forward of one image: :data:`GFLOPS_32`, counted by torch's FLOP counter (2 per
  multiply-add, convolutions and matmuls) at 32x32 and scaled by the dataset's pixels (an architecture
  missing there is counted on the meta device); ``estimate.gflops`` overrides an arch.
* A backward costs ``backward_factor`` (default 2) forwards.
* Evaluation attacks per image: :data:`ATTACK_PASSES`; AutoAttack (standard) runs APGD-CE on every
  image, then APGD-T (9 x 100), FAB-T (9 x 100) and Square (5000 forward queries) on the fraction
  still robust (``estimate.aa_robust_fraction``, default 0.5).
* Throughput: :data:`REFERENCE_TFLOPS` sustained per training precision on one H100/H200-class GPU
  (evaluation and validation run in strict fp32); ``estimate.tflops`` replaces it with one figure,
  e.g. 0.05 for 2 CPU cores (BENCHMARKS.md: pgd_at on small_cnn at 577 img/s = 0.06 TFLOP/s).
* Not counted: method diagnostics on the validation set (a few % of an epoch), data loading,
  communication between workers (device-hours are summed over devices, not wall-clock).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from .spec import EstimateSpec

REFERENCE_TFLOPS = {"fp32": 25.0, "tf32": 60.0, "bf16": 100.0}
REFERENCE_DEVICE = "one H100/H200-class GPU"
# (training images, test images) of each dataset's full training and test splits
DATASET_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "tinyimagenet": (100000, 10000),
                 "mnist": (60000, 10000), "fashion_mnist": (60000, 10000), "digits": (1348, 449), "synthetic": (2000, 500)}
VAL_FRACTION, VAL_CAP = 0.1, 1000  # raydistill.data's default holdout
# (forwards, backwards) per image of each evaluation attack on the student; aa: see aa_passes
ATTACK_PASSES = {"clean": (1, 0), "fgsm": (2, 1), "pgd10": (11, 10), "pgd20": (21, 20), "cw": (31, 30)}
UNKNOWN_ATTACK = 100  # forward+backward pairs per image of an attack missing here (estimate.attack_passes)

# (network, arch role, forwards, backwards) per image of one training step, K = attack steps
Passes = list[tuple[str, str, int, int]]


def _hp(cfg, name: str, default: Any = None) -> Any:
    return cfg.hp.get(name, default)


def _alpha_one(cfg) -> bool:
    a = _hp(cfg, "alpha", 1.0)
    return isinstance(a, (int, float)) and a == 1


def _aka(cfg, member: str, role: str) -> Passes:
    n = int(_hp(cfg, "n_teachers", _hp(cfg, "n_students", 3)))
    m = int(_hp(cfg, "svgd_steps", 20))
    per = m * (n if _hp(cfg, "svgd_target") == "ensemble" else 1) + 1
    return [(f"{member}{i}", role, per, per) for i in range(n)]


PASSES: dict[str, Callable[[Any, int], Passes]] = {
    "natural": lambda c, k: [("student", "student", 1, 1)],
    "pgd_at": lambda c, k: [("student", "student", k + 1, k + 1)],
    "trades": lambda c, k: [("student", "student", k + 3, k + 2)],
    "ard": lambda c, k: [("student", "student", k + 1 + (not _alpha_one(c)), k + 1 + (not _alpha_one(c))),
                         ("teacher", "teacher", 1, 0)],
    "rslad": lambda c, k: [("student", "student", k + 2, k + 2), ("teacher", "teacher", 1, 0)],
    "akd2": lambda c, k: [("student", "student", k + 1, k + 1), ("teacher", "teacher", 1, 0),
                          ("teacher_nat", "teacher_nat", 1, 0)],
    "iad1": lambda c, k: [("student", "student", k + 2, k + 2), ("teacher", "teacher", 2, 0)],
    "iad2": lambda c, k: [("student", "student", k + 2, k + 2), ("teacher", "teacher", 1, 0),
                          ("teacher_nat", "teacher_nat", 1, 0)],
    "adaad": lambda c, k: [("student", "student", k + 1 + (not _alpha_one(c)), k + 1 + (not _alpha_one(c))),
                           ("teacher", "teacher", k + 1 + (not _alpha_one(c)), k)],
    "adaiad": lambda c, k: [("student", "student", k + 2, k + 2), ("teacher", "teacher", k + 1 + (not _alpha_one(c)), k)],
    "peeraid": lambda c, k: [("student", "student", k + 2, k + 2), ("peer", "peer", 2, 1)],
    "at_aka": lambda c, k: [("student", "student", 1, 1)] + _aka(c, "teacher", "peer"),
    "cat_aka": lambda c, k: _aka(c, "student", "student"),
}


# GFLOPs of one forward of one 3x32x32 image, 10 classes (torch.utils.flop_counter, 2 per multiply-add);
# a forward's FLOPs scale with the image's pixels (these networks pool adaptively): x1/16 on 8x8, x4 on 64x64
GFLOPS_32 = {"resnet18": 1.1108, "resnet34": 2.3188, "preact_resnet18": 1.1108, "wrn34_10": 13.318, "wrn34_20": 53.164,
             "wrn70_16": 77.528, "mobilenet_v2": 0.1823, "vgg16": 0.6264, "small_cnn": 0.0490}


def gflops_of(arch: str, dataset: str) -> float:
    """GFLOPs of one forward of one image of ``dataset`` through ``arch``: the table scaled to its size, or
    counted for an architecture not in it."""
    from ..data import DATASETS

    spec = DATASETS.get(dataset)
    shape = spec.in_shape or (3, 32, 32)
    if arch in GFLOPS_32:
        return GFLOPS_32[arch] * shape[1] * shape[2] / (32 * 32)
    return counted_gflops(arch, shape, spec.num_classes or 10)


@functools.lru_cache(maxsize=None)
def counted_gflops(arch: str, shape: tuple[int, int, int], classes: int) -> float:
    """GFLOPs of one forward of one image by torch's FLOP counter on the meta device (nothing computed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..models import build_model

    with torch.device("meta"):
        model, x = build_model(arch, classes, shape).eval(), torch.zeros(1, *shape)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


@dataclass(frozen=True)
class CostModel:
    """Device-hours of the study's runs on ``dataset`` under the assumptions of ``estimate``."""

    dataset: str
    estimate: EstimateSpec

    def gflops(self, arch: str) -> float:
        return self.estimate.gflops.get(arch) or gflops_of(arch, self.dataset)

    def tflops(self, precision: str) -> float:
        return self.estimate.tflops or REFERENCE_TFLOPS.get(precision, REFERENCE_TFLOPS["fp32"])

    def sizes(self) -> tuple[int, int]:
        """(training, test) images of the whole dataset: the table's, else its spec's (folder:, npz:), else synthetic's."""
        from ..data import DATASETS

        return DATASET_SIZES.get(self.dataset) or DATASETS.get(self.dataset).sizes or DATASET_SIZES["synthetic"]

    def images(self, val_size: int | None) -> tuple[int, int, int]:
        """(training, validation, test) images per epoch / at the end, with the run's holdout."""
        n_train, n_test = self.sizes()
        val = min(VAL_CAP, int(VAL_FRACTION * n_train)) if val_size is None else int(val_size)
        return (n_train - val, val, n_test) if val else (n_train, n_test, n_test)

    def step_passes(self, cfg) -> Passes:
        fn = PASSES.get(cfg.method)
        if fn is None:  # a method added after this table: a PGD-AT-like step (see the plan's assumptions)
            return [("student", "student", cfg.attack_steps + 2, cfg.attack_steps + 2)]
        return fn(cfg, cfg.attack_steps)

    def step_gflops(self, cfg, archs: dict[str, str]) -> float:
        """GFLOPs of one training step per image; ``archs``: role (student, peer, teacher...) -> arch."""
        bf = self.estimate.backward_factor
        return sum((f + bf * b) * self.gflops(archs[role]) for _, role, f, b in self.step_passes(cfg))

    def attack_gflops(self, attack: str, arch: str) -> float:
        bf, g = self.estimate.backward_factor, self.gflops(arch)
        if attack in self.estimate.attack_passes:
            return (1 + bf) * self.estimate.attack_passes[attack] * g
        if attack == "aa":
            r = self.estimate.aa_robust_fraction
            return (1 + 100 * (1 + bf) + r * (900 * (1 + bf) + 900 * (1 + bf) + 5000)) * g
        f, b = ATTACK_PASSES.get(attack, (UNKNOWN_ATTACK + 1, UNKNOWN_ATTACK))
        return (f + bf * b) * g

    def _hours(self, gflop: float, precision: str) -> float:
        return gflop / (self.tflops(precision) * 1000) / 3600

    def epoch_hours(self, cfg, archs: dict[str, str]) -> float:
        """One epoch of training + validation (clean and PGD-10 of the student)."""
        n_train, n_val, _ = self.images(cfg.val_size)
        val = n_val * (self.attack_gflops("clean", cfg.student) + self.attack_gflops("pgd10", cfg.student))
        return self._hours(n_train * self.step_gflops(cfg, archs), cfg.precision) + self._hours(val, "fp32")

    def run_hours(self, cfg, archs: dict[str, str], epochs: int | None = None) -> float:
        """A training run: its epochs, its final test attacks on the test split, the overhead."""
        _, _, n_test = self.images(cfg.val_size)
        test = n_test * sum(self.attack_gflops(a, cfg.student) for a in cfg.test_attacks)
        return ((cfg.epochs if epochs is None else epochs) * self.epoch_hours(cfg, archs)
                + self._hours(test, "fp32") + self.overhead_hours())

    def eval_hours(self, arch: str, attacks: tuple[str, ...], n: int) -> float:
        return self._hours(n * sum(self.attack_gflops(a, arch) for a in attacks), "fp32") + self.overhead_hours()

    def overhead_hours(self) -> float:
        return self.estimate.overhead_s / 3600

    def test_images(self) -> int:
        return self.sizes()[1]

    def assumptions(self, archs: list[str]) -> list[str]:
        """What the estimate assumes, one line each, for the plan's output."""
        e = self.estimate
        rate = (f"{e.tflops:g} TFLOP/s sustained (estimate.tflops)" if e.tflops else
                "sustained TFLOP/s of " + REFERENCE_DEVICE + ": " + ", ".join(f"{k} {v:g}" for k, v in REFERENCE_TFLOPS.items())
                + " (training at its precision; validation and evaluation strict fp32; estimate.tflops overrides)")
        flops = ", ".join(f"{a} {self.gflops(a):.4g}" + (" (given)" if a in e.gflops else "") for a in archs)
        return [
            "device-hours = FLOPs / throughput + overhead, summed over devices (not wall-clock)",
            f"throughput: {rate}",
            f"GFLOPs of one forward per {self.dataset} image (torch's FLOP counter at 32x32, scaled by pixels; "
            f"estimate.gflops overrides): {flops}",
            f"a backward = {e.backward_factor:g} forwards; passes per training step as counted by raydistill.bench "
            "(attack steps and teachers' forwards included; IAD/AdaIAD after warm-up)",
            "each epoch: the training split + validation (clean and PGD-10 of the student); each training run ends "
            "with its test attacks on the test split; method diagnostics not counted",
            f"AutoAttack: APGD-CE on every image, then APGD-T, FAB-T (9 x 100 each) and Square (5000 queries) "
            f"on the {e.aa_robust_fraction:g} still robust (estimate.aa_robust_fraction)",
            f"overhead: {e.overhead_s:g} s per training run, trial and evaluation (estimate.overhead_s)",
        ]
