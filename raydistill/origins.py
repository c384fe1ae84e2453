"""Where a registered name comes from: the registries a plugin may add to, and the plugin behind a name.

Below raydistill.plugins (which loads plugins) and raydistill.provenance (which records them): both, and the
study's table, ask here.
"""
from __future__ import annotations

from typing import Any

from . import registry


def registries() -> dict[str, registry.Registry]:
    """Kind -> the registry a plugin may add to (the built-ins' own)."""
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    return {"method": METHODS, "model": MODELS, "dataset": DATASETS}


def origin(kind: str, name: str) -> Any:
    """``registry.BUILT_IN`` or the plugin that registered ``name`` in the ``kind`` registry."""
    return registries()[kind].origin(name)


def plugin_of(kind: str, name: str) -> Any | None:
    """The plugin that registered ``name`` (None: built-in, or not registered)."""
    reg = registries()[kind]
    if name not in reg:
        return None
    o = reg.origin(name)
    return None if o == registry.BUILT_IN else o
