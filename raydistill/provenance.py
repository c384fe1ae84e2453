"""Which code produced a run: each plugin's digest and version, recorded with the run and checked on a relaunch.

* :func:`digest`: ``sha256:<hex>`` of a plugin's file, or of its package's Python and YAML files;
* every run records the plugins whose names it uses (``plugins.used_by``) as MLflow tags
  (``plugin.<name>`` = the digest, ``plugin.<name>.source``) and in its summary JSON (``"plugins"``), and
  in its folder (``plugins.json``: a training run's, a search's, a study's);
* :func:`check_resume`: a relaunch that would resume a run, a search or a study whose plugins changed since is
  refused in one line, unless ``--allow-changed-plugin``: then it resumes and the change is recorded (the
  folder's history, and the tag ``plugin.<name>.changed`` = ``OLD -> NEW``). One table never mixes two
  versions of a method unawares.
"""
from __future__ import annotations

import json
import time

from .codedigest import digest
from .errors import UsageError

__all__ = ["digest", "used_by", "used_by_all", "tags", "record", "check_resume", "require"]


# ----------------------------------------------------------------------------- records and relaunches
def used_by_all(configs) -> dict[str, dict]:
    """The plugins any of ``configs`` uses (a study's): name -> record."""
    out: dict[str, dict] = {}
    for cfg in configs:
        out.update(used_by(cfg))
    return out


def used_by(cfg) -> dict[str, dict]:
    """The plugins whose names configuration ``cfg`` uses (method, networks, dataset): name -> record."""
    from .origins import plugin_of

    names = [("method", getattr(cfg, "method", None)), ("dataset", getattr(cfg, "dataset", None))]
    names += [("model", getattr(cfg, a, None)) for a in ("student", "peer", "teacher_arch", "natural_teacher_arch")]
    names = [(kind, name) for kind, name in names if name]
    out = {}
    for kind, name in names:
        p = plugin_of(kind, name)
        if p is not None:
            out[p.name] = p.record()
    return out


RECORD_FILE = "plugins.json"  # in a run's, a search's or a study's folder


def tags(used: dict[str, dict], changes: dict[str, tuple] | None = None) -> dict[str, str]:
    """MLflow tags of a run's plugins: ``plugin.<name>`` (digest), ``plugin.<name>.source`` (where it came from,
    with the version of a package) and, after an allowed change, ``plugin.<name>.changed`` (``OLD -> NEW``)."""
    out = {}
    for name, r in used.items():
        out[f"plugin.{name}"] = r["digest"]
        out[f"plugin.{name}.source"] = r["source"][:5000]
    for name, (old, new) in (changes or {}).items():
        out[f"plugin.{name}.changed"] = f"{old or 'absent'} -> {new or 'absent'}"
    return out


def check_resume(folder: str, used: dict[str, dict], allow: bool, what: str) -> dict[str, tuple]:
    """Compare the plugins ``used`` now with those recorded in ``folder`` (a relaunch that resumes ``what``):
    returns ``{name: (old digest, new digest)}`` of the changed ones; a change is a UsageError unless ``allow``."""
    from . import storage

    if not used:  # built-ins only (a plugin's run relaunched without it fails on its unknown name first)
        return {}
    path = storage.join(folder, RECORD_FILE)
    try:
        before = json.loads(storage.read_bytes(path)).get("plugins", {})
    except FileNotFoundError:
        return {}
    changes = {n: (before.get(n, {}).get("digest"), used.get(n, {}).get("digest")) for n in sorted({*before, *used})
               if before.get(n, {}).get("digest") != used.get(n, {}).get("digest")}
    if changes and not allow:
        name, (old, new) = next(iter(changes.items()))
        was = f"was started with plugin {name} {old}" if old else f"was started without plugin {name}"
        now = f"it is now {new}" if new else "it is not used now"
        raise UsageError(f"{what} {was} ({before.get(name, {}).get('source', '')}); {now}: resuming would mix two "
                         "versions of its code in one result; give --allow-changed-plugin to resume anyway (the change "
                         "is recorded), or another --name to start afresh")
    return changes


def record(folder: str, used: dict[str, dict], changes: dict[str, tuple] | None = None) -> None:
    """Write ``folder``/plugins.json: the plugins used now, and the history of allowed changes."""
    from . import storage

    if not used:
        return
    path = storage.join(folder, RECORD_FILE)
    try:
        history = json.loads(storage.read_bytes(path)).get("history", [])
    except FileNotFoundError:
        history = []
    if changes:
        history.append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "changed": {n: {"old": old, "new": new} for n, (old, new) in changes.items()}})
    storage.write_bytes(path, json.dumps({"plugins": used, "history": history}, indent=2).encode())


_noted: set = set()


def require(kind: str, name: str, meta: dict, source: str) -> None:
    """Before a checkpoint's network (``kind`` model) or dataset ``name`` is used: a plugin's that is not loaded is one
    error line naming the plugin the checkpoint records; loaded with another digest than it was trained with, a note
    says so."""
    import sys

    from .origins import plugin_of, registries

    rec = next(((plugin, r) for plugin, r in (meta.get("plugins") or {}).items()
                if name in (r.get("provides") or {}).get(kind, [])), None)
    if name not in registries()[kind]:
        if rec is not None:
            plugin, r = rec
            raise UsageError(f"{source} holds a {kind} '{name}' of plugin {plugin} ({r.get('source')}, {r.get('digest')}), "
                             "which is not loaded: give --plugin FILE_OR_MODULE (or install its package)")
        return
    loaded = plugin_of(kind, name)
    if rec is not None and loaded is not None and loaded.digest != rec[1].get("digest") and (source, name) not in _noted:
        _noted.add((source, name))
        print(f"note: {source} was trained with plugin {rec[0]} {rec[1].get('digest')}; its {kind} '{name}' is the "
              f"plugin's loaded now, {loaded.digest}", file=sys.stderr)
