"""The dataset registry: a dataset's facts (:class:`DatasetSpec`), what its loader returns (:class:`_Splits`),
:func:`register`, and the fixed stratified holdout every loader and the validation split use
(:func:`stratified_split`). The loaders live in raydistill.data (CIFAR, TinyImageNet, digits, synthetic) and
raydistill.mnist (MNIST, Fashion-MNIST), which register into :data:`DATASETS`; everything else reads it through
raydistill.data (which imports both), so every name is there."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .errors import UsageError, first_line
from .registry import Registry

HOLDOUT_SEED = 0  # the validation holdout and the digits test split never depend on the run seed


class _Splits(NamedTuple):
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    hflip: bool
    crop_pad: int
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's facts: its loader, class count and image shape (None: set by its options), and the
    training defaults that suit it (the configuration's dataset layer: threat model, schedule), and
    its (training, test) image counts where they are not in study.cost's table."""

    loader: Callable[..., _Splits]
    num_classes: int | None
    in_shape: tuple[int, int, int] | None
    defaults: dict = field(default_factory=dict)
    sizes: tuple[int, int] | None = None


# name -> DatasetSpec; a loader is loader(data_dir: Path, download: bool, **options) -> _Splits. Besides the
# registered names, folder:PATH and npz:PATH: data without code (raydistill.userdata, registered at the end).
DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register(name: str, num_classes: int | None, in_shape: tuple[int, int, int] | None, **defaults):
    """Register a loader function under ``name`` with its facts and training defaults."""
    def deco(loader: Callable[..., _Splits]) -> Callable[..., _Splits]:
        DATASETS.add(name, DatasetSpec(loader, num_classes, in_shape, defaults))
        return loader

    return deco


def stratified_split(y: Tensor, n_holdout: int, seed: int = HOLDOUT_SEED) -> tuple[Tensor, Tensor]:
    """Sorted indices ``(keep, holdout)`` with ``n_holdout`` samples held out, class proportions preserved."""
    from sklearn.model_selection import train_test_split

    try:
        keep, held = train_test_split(np.arange(len(y)), test_size=n_holdout, stratify=y.numpy(), random_state=seed)
    except ValueError as exc:  # e.g. a class with a single sample
        raise UsageError(f"cannot hold out {n_holdout} samples stratified by class: {first_line(exc)}") from None
    return torch.from_numpy(np.sort(keep)), torch.from_numpy(np.sort(held))
