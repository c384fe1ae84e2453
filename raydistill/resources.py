"""What the connected Ray cluster has free, who holds the rest, and giving back what this job left reserved.

Ray Train reserves each run's workers in a placement group (one bundle per worker). When a run ends
ungracefully (a search's trial that ends, or ASHA stops) its controller actor dies and a detached
``PlacementGroupCleaner`` actor removes the group, asynchronously; on a busy cluster, or where that
actor cannot reach the cluster's state, the group stays CREATED with nothing in it, and the CPUs it holds
are lost to everything after it (an evaluation's workers that then wait forever). So:

* :func:`release_placement_groups`: after a search (and between a study's stages) every placement group
  of this job is gone: Ray Train's clean-up is waited for a few seconds, what is left of this job's is
  removed, and one line says so (and, in one line, what else holds the cluster).
* :func:`free` / :func:`held_by`: the free CPUs/GPUs and, in one line, who holds the rest (placement
  groups by job, the rest tasks and actors): the evaluation's and the waiting messages.

A placement group's id ends with the id of the job that created it (Ray's ``PlacementGroupID`` = unique
bytes + ``JobID``), which is how this job's groups are told from other jobs' ones.
"""
from __future__ import annotations

import time
from typing import Callable

# Seconds to wait for Ray Train's own clean-up of a finished run's placement group before removing it
CLEANUP_WAIT_S = 10.0
_LIVE = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")


def job_id() -> str:
    import ray

    return ray.get_runtime_context().get_job_id()


def _groups() -> dict[str, dict]:
    """The cluster's placement groups that are not removed: id -> Ray's record of it."""
    import ray

    table = ray.util.placement_group_table() or {}
    return {pg_id: info for pg_id, info in table.items() if info.get("state") in _LIVE}


def _job_of(pg_id: str) -> str:
    return pg_id[-8:]  # the JobID's 4 bytes, in hex


def _held(info: dict, resource: str) -> float:
    return sum(float(b.get(resource, 0.0)) for b in (info.get("bundles") or {}).values())


def free(resource: str = "CPU") -> float:
    """How much of ``resource`` no task, actor or placement group holds now."""
    import ray

    return float(ray.available_resources().get(resource, 0.0))


def held_by(resources: tuple[str, ...] = ("CPU",)) -> str:
    """One line: what of ``resources`` the cluster has free, and what holds the rest."""
    import ray

    try:
        total, avail = ray.cluster_resources(), ray.available_resources()
        groups = _groups()
    except Exception:  # noqa: BLE001 - only for a message
        return "the cluster's resources are unknown"
    parts = []
    for r in resources:
        if total.get(r, 0.0) <= 0:
            continue
        parts.append(f"{r} {avail.get(r, 0.0):g} of {total[r]:g} free")
    mine = job_id()
    holders = []
    for pg_id, info in groups.items():
        amounts = ", ".join(f"{r} {_held(info, r):g}" for r in resources if _held(info, r))
        if amounts:
            who = "this job" if _job_of(pg_id) == mine else f"job {_job_of(pg_id)}"
            holders.append(f"placement group {pg_id[:8]} of {who} ({amounts}, {info.get('state', '?').lower()})")
    text = "; ".join(parts) or "no CPU or GPU"
    if holders:
        text += "; held: " + ", ".join(holders[:4]) + (f" and {len(holders) - 4} more" if len(holders) > 4 else "")
        text += "; the rest by running tasks and actors" if any(avail.get(r, 0.0) < total.get(r, 0.0) - sum(
            _held(i, r) for i in groups.values()) for r in resources) else ""
    elif any(avail.get(r, 0.0) < total.get(r, 0.0) for r in resources):
        text += "; held by running tasks and actors (`ray status`, `ray list actors` tell whose)"
    return text


def _say(text: str) -> None:
    print(f"[raydistill] {text}", flush=True)


def release_placement_groups(say: Callable[[str], None] = _say, wait_s: float = CLEANUP_WAIT_S) -> int:
    """Leave nothing of this job reserved: wait up to ``wait_s`` for Ray Train to remove the placement groups of
    this job's finished runs, remove those left, and say so in one line; one more line when other jobs' groups hold
    CPUs or GPUs. Call it only when no run of this job is running (after a search, between a study's stages).
    Returns how many groups it removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    mine = job_id()
    deadline = time.monotonic() + wait_s
    while True:
        left = {pg_id: info for pg_id, info in _groups().items() if _job_of(pg_id) == mine}
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    for pg_id in left:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    if left:
        held = ", ".join(f"CPU {_held(i, 'CPU'):g}" + (f" GPU {_held(i, 'GPU'):g}" if _held(i, "GPU") else "")
                         for i in left.values())
        say(f"removed {len(left)} placement group{'s' if len(left) > 1 else ''} that finished runs of this "
            f"job left reserved ({held}; Ray Train had not cleaned {'them' if len(left) > 1 else 'it'} up in {wait_s:g}s)")
    others = [i for pg_id, i in _groups().items() if _job_of(pg_id) != mine and (_held(i, "CPU") or _held(i, "GPU"))]
    if others:
        say(f"note: other jobs hold part of the cluster: {held_by(('CPU', 'GPU'))}")
    return len(left)
