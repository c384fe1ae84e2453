"""The public extension API: everything a plugin (a user's own method, model or dataset) imports.

Stable: names are added here, never renamed or dropped (docs/extending.md documents each). The built-in
methods, models and datasets use the same classes and registries, so a plugin can do what a built-in does.

* methods: :class:`Method` (and :class:`OfflineMethod` for students of frozen teachers), :class:`NetSpec`,
  :class:`Nets`, :class:`StepContext`, :class:`HP`, :func:`attack_hparams`; hyperparameter ranges
  :class:`Range` and the named ones (WEIGHT, NON_NEGATIVE, POSITIVE, FRACTION, COUNT, AT_LEAST_ONE);
  the loss functions (:mod:`raydistill.losses`) and the attack core (:mod:`raydistill.attacks`);
* models: the MODELS registry, ``name -> factory(num_classes, in_channels) -> nn.Module``;
* datasets: the DATASETS registry and :func:`register_dataset` (a loader returning :class:`Splits`).
"""
from __future__ import annotations

from . import attacks, losses
from .data import DATASETS, DatasetSpec
from .data import _Splits as Splits
from .data import register as register_dataset
from .hparams import AT_LEAST_ONE, COUNT, FRACTION, NON_NEGATIVE, POSITIVE, WEIGHT, Range
from .methods._teachers import OfflineMethod
from .methods.base import HP, Method, NetSpec, Nets, StepContext, attack_hparams
from .models import MODELS

__all__ = ["attacks", "losses", "Method", "OfflineMethod", "NetSpec", "Nets", "StepContext", "HP", "attack_hparams",
           "Range", "WEIGHT", "NON_NEGATIVE", "POSITIVE", "FRACTION", "COUNT", "AT_LEAST_ONE",
           "MODELS", "DATASETS", "DatasetSpec", "Splits", "register_dataset"]
