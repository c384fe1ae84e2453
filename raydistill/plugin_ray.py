"""Plugins on a Ray cluster: what the driver ships to every worker, and what every node must have installed.

* :func:`runtime_env`: the job-level runtime environment ``train.init_ray`` starts or joins Ray with: the
  file and local-module plugins this driver loaded go to every worker of every node as ``py_modules`` (a
  ``.py`` file, or its package's folder), and ``RAYDISTILL_PLUGINS`` names their modules there (with
  ``RAYDISTILL_PLUGIN_SOURCES``: where the driver found them, for the records), so that every worker imports
  them on its first registry lookup. Inside a ``ray job submit`` job the driver already runs in the job's
  runtime environment: the two are merged (the job's working_dir, py_modules and variables are kept).
* :func:`check_nodes`: an installed plugin (a package's entry points, or a module in site-packages) is not
  shipped: each alive node must have it, with the same digest. A tiny task pinned to each node looks; a node
  that lacks it (or has another version) is one ``error:`` line naming the node and the package.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Iterator

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray inside a submitted job: its JobConfig as JSON
OVERRIDE_ENV = "RAY_OVERRIDE_JOB_RUNTIME_ENV"


def runtime_env() -> dict:
    """The runtime environment that ships this driver's file and local-module plugins ({} when there are none)."""
    from .plugins import ENV, LOADED, SOURCES_ENV

    named = [p for p in LOADED.values() if p.module]  # files and modules (a package's entry points load themselves)
    if not named:
        return {}
    env = {"env_vars": {ENV: ",".join(p.module for p in named),
                        SOURCES_ENV: json.dumps({p.module: {"kind": p.kind, "source": p.source} for p in named})}}
    shipped = sorted({p.ship for p in named if p.ship})  # an installed module is not: every node has it (check_nodes)
    return {"py_modules": shipped, **env} if shipped else env


@contextmanager
def init_options(kwargs: dict) -> Iterator[dict]:
    """``kwargs`` for ray.init with the plugins' runtime environment; inside a submitted job, merged with the job's
    own (Ray refuses a driver's runtime_env that repeats a field of the job's unless told to override)."""
    env, base = runtime_env(), kwargs.get("runtime_env") or {}  # base: init_ray's own (the job's RAY_ADDRESS)
    if not env:
        yield kwargs
        return
    if base:
        env = {**base, **env, "env_vars": {**(base.get("env_vars") or {}), **env["env_vars"]}}
    job = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
    override = {}
    if job:
        merged = {"env_vars": {**(job.get("env_vars") or {}), **env["env_vars"]}}
        if env.get("py_modules"):
            merged["py_modules"] = list(dict.fromkeys([*(job.get("py_modules") or []), *env["py_modules"]]))
        if set(merged) & set(job):
            env, override = merged, {OVERRIDE_ENV: "1"}
    saved = {k: os.environ.get(k) for k in override}
    os.environ.update(override)
    try:
        yield {**kwargs, "runtime_env": env}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_nodes() -> None:
    """Every installed plugin on every alive node, with this driver's digest (else one error line)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .errors import UsageError
    from .plugins import LOADED

    installed = [p for p in LOADED.values() if p.ship is None and p.roots]
    if not installed:
        return
    wanted = {p.name: p.modules() for p in installed}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    try:
        found = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                         .remote(wanted) for n in nodes])
    except ray.exceptions.RayError:  # a node lost meanwhile: its workers would not run there either
        return
    for node, there in zip(nodes, found):
        for p in installed:
            digest, version = there.get(p.name, (None, None))
            if digest == p.digest:
                continue
            where = f"node {node['NodeManagerAddress']} (id {node['NodeID'][:12]}, one of the cluster's {len(nodes)})"
            what = f"plugin {p.label}"
            if digest is None:
                raise UsageError(f"{what} is not installed on {where}: every node needs it (Ray's workers import it "
                                 "there); install it in each node's image or setup commands (docs/clusters.md, Plugins)")
            versions = f" (version {version} there, {p.version} here)" if version != p.version else ""
            raise UsageError(f"{what} differs on {where}: {digest} there, {p.digest} here{versions}; install the same "
                             "version on every node (docs/clusters.md, Plugins)")


def _probe(wanted: dict[str, list[str]]) -> dict[str, tuple[str | None, str | None]]:
    """On one node: name -> (digest of the plugin's modules as installed there, or None when missing; version)."""
    from pathlib import Path

    from .plugins import _distribution_of, _find
    from .codedigest import digest

    out = {}
    for name, modules in wanted.items():
        roots = []
        for module in modules:
            where = _find(module)
            if where is None or where == "(built in)":
                roots = []
                break
            root = Path(where)
            roots.append(root.parent if root.name == "__init__.py" else root)
        dist = _distribution_of(modules[0]) if roots else None
        out[name] = (digest(roots) if roots else None, dist[1] if dist else None)
    return out
