"""Registry of methods: name -> Method class (see base.py for the interface).

Every module in this package is imported, and each Method subclass with a ``name`` is registered:
adding a method is adding one small file.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from ..registry import Registry
from .base import HP, Method, NetSpec, Nets, StepContext

METHODS: Registry[type[Method]] = Registry("method")

# The contract's order, used for listing.
ORDER = ("natural", "pgd_at", "trades", "ard", "rslad", "akd2", "iad1", "iad2", "adaad", "adaiad",
         "peeraid", "at_aka", "cat_aka")


def _discover() -> None:
    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Method) and obj.name and obj.__module__ == module.__name__:
                found[obj.name] = obj
    for name in sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        METHODS.add(name, found[name])


_discover()


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def selected_by(name: str) -> str:
    """The validation metric that picks method ``name``'s best checkpoint (its ``selection``):
    val/pgd10_acc, or val/clean_acc for natural training."""
    return f"val/{get_method(name).selection}_acc"


__all__ = ["METHODS", "get_method", "selected_by", "Method", "NetSpec", "Nets", "HP", "StepContext"]
