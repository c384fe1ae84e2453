"""The public extension API: everything a plugin (a user's own method, model or dataset) imports.

Stable: names are added here, never renamed or dropped (docs/extending.md documents each). The built-in
methods, models and datasets use the same classes and registries, so a plugin can do what a built-in does.

* methods: :class:`Method` (and :class:`OfflineMethod` for students of frozen teachers), :class:`NetSpec`,
  :class:`Nets`, :class:`StepContext`, :class:`HP`, :func:`attack_hparams`; hyperparameter ranges
  :class:`Range` and the named ones (WEIGHT, NON_NEGATIVE, POSITIVE, FRACTION, COUNT, AT_LEAST_ONE);
  the loss functions (:mod:`raydistill.losses`) and the attack core (:mod:`raydistill.attacks`);
  a method may declare its search space (``search_space = "FILE.yaml"``, relative to its module's file);
* models: :func:`register_model` (``name``, a ``factory(num_classes, in_channels) -> nn.Module`` and the
  ``input_sizes`` it accepts) into the MODELS registry;
* datasets: the DATASETS registry and :func:`register_dataset` (a loader returning :class:`Splits`).

A plugin (a ``.py`` file or module given with ``--plugin``, ``plugins:`` or ``RAYDISTILL_PLUGINS``, or an
installed package's entry points in the groups :data:`ENTRY_POINT_GROUPS`) imports these; its Method
subclasses are found and registered, its models and datasets register themselves (raydistill.plugins).
"""
from __future__ import annotations

from . import attacks, losses
from .data import DATASETS, DatasetSpec
from .data import _Splits as Splits
from .data import register as register_dataset
from .hparams import AT_LEAST_ONE, COUNT, FRACTION, NON_NEGATIVE, POSITIVE, WEIGHT, Range
from .methods._teachers import OfflineMethod
from .methods.base import HP, Method, NetSpec, Nets, StepContext, attack_hparams
from .models import MODELS, register_model
from .plugins import GROUPS

ENTRY_POINT_GROUPS = tuple(GROUPS)  # raydistill.methods, raydistill.models, raydistill.datasets

__all__ = ["attacks", "losses", "Method", "OfflineMethod", "NetSpec", "Nets", "StepContext", "HP", "attack_hparams",
           "Range", "WEIGHT", "NON_NEGATIVE", "POSITIVE", "FRACTION", "COUNT", "AT_LEAST_ONE",
           "MODELS", "register_model", "DATASETS", "DatasetSpec", "Splits", "register_dataset", "ENTRY_POINT_GROUPS"]
