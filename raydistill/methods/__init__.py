"""Registry of methods: name -> Method class (see base.py for the interface)."""
from __future__ import annotations

from ..registry import Registry
from .base import HP, Method, NetSpec, Nets, StepContext
from .baselines import PGDAT, TRADES, Natural

METHODS: Registry[type[Method]] = Registry("method")
for _cls in (Natural, PGDAT, TRADES):
    METHODS.add(_cls.name, _cls)

# The contract's method names, in its order; the ones not registered yet are listed but refused.
ALL_METHOD_NAMES = ("natural", "pgd_at", "trades", "ard", "rslad", "akd2", "iad1", "iad2", "adaad",
                    "adaiad", "peeraid", "at_aka", "cat_aka")


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


__all__ = ["METHODS", "ALL_METHOD_NAMES", "get_method", "Method", "NetSpec", "Nets", "HP", "StepContext"]
