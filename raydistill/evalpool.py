"""The Ray workers of a sharded evaluation: as many as the cluster has room for, units only to started ones.

* **Workers follow the free resources.** ``--workers N`` is a maximum: the pool starts
  min(N, what the cluster's *free* CPUs (GPUs) hold), at least one, and says so when that is fewer.
* **Units go to started workers only.** A worker is an actor; a unit (one attack on one batch) is handed to
  it once it has started (its ``__ray_ready__`` answered), so no batch waits in the queue of a worker that
  cannot be placed while another idles.
* **A worker that cannot be placed** within ``PLACE_LIMIT_S`` while others run is given up (its share goes
  to the live ones); a worker lost with its node is replaced, its unit back in the queue.
* **No worker at all**: one line a minute saying what holds the cluster, and after ``--worker-wait``
  seconds :class:`WorkersUnavailable` (one ``error:`` line; the finished units stay stored, a relaunch of
  the same evaluation continues).
"""
from __future__ import annotations

import collections
import time
from typing import Any, Callable

PLACE_LIMIT_S = 60.0  # a worker not started this long, while others run, is given up
WAIT_LINE_S = 60.0  # with no worker started: one "waiting" line a minute
POLL_S = 5.0


class WorkersUnavailable(RuntimeError):
    """No evaluation worker could be placed within ``--worker-wait`` seconds."""


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def plan_workers(asked: int, gpus_per_worker: float | None, cpus_per_worker: int | None) -> tuple[int, float, float, str]:
    """(workers, CPUs each, GPUs each, note): the workers to start for ``asked`` from the free resources."""
    import ray

    from . import resources
    from .errors import UsageError

    total, nodes = ray.cluster_resources(), [n for n in ray.nodes() if n.get("Alive")]
    per_node = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=1.0)
    gpus_total = total.get("GPU", 0.0)
    gpus_each = (1.0 if gpus_total >= 1 else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
    if gpus_each > 0 and gpus_each > gpus_total:
        raise UsageError(f"--gpus-per-worker {gpus_each:g}: the cluster has {gpus_total:g} GPUs")
    free_cpus = resources.free("CPU")
    if cpus_per_worker:
        cpus = float(cpus_per_worker)
        if cpus > per_node:
            raise UsageError(f"--cpus-per-worker {cpus_per_worker}: no node of the cluster has more than {per_node:g} CPUs")
    else:  # the free CPUs shared by the workers, whole, at least one, no more than one node has
        cpus = 1.0 if gpus_each > 0 else float(max(1, min(int(free_cpus // asked), int(per_node))))
    room = int(free_cpus // cpus)
    if gpus_each > 0:
        room = min(room, int(resources.free("GPU") // gpus_each))
    n = max(1, min(asked, room))
    note = ""
    if n < asked:
        note = (f"--workers {asked}: the cluster has room for {max(room, 0)} now ({resources.held_by(('CPU', 'GPU'))}); "
                f"starting {n}")
    return n, cpus, gpus_each, note


def run(make_actor: Callable[[], Any], todo: collections.deque, *, workers: int, worker_wait: float,
        need: str, say: Callable[[str], None], on_result: Callable[[str, int, Any, int], None]) -> int:
    """Attack every unit in ``todo`` ((attack, chunk) pairs) on up to ``workers`` actors made by ``make_actor``;
    ``on_result(attack, chunk, result, live)`` stores each as it arrives (``live``: the workers started).
    Returns the units run."""
    import ray

    from . import resources

    start = time.monotonic()
    pending: dict[Any, tuple[Any, float]] = {}  # ready ref -> (actor, since)
    live: list[Any] = []
    idle: collections.deque = collections.deque()
    inflight: dict[Any, tuple[Any, str, int]] = {}
    made, lost, ran = 0, 0, 0
    last_line = start

    def spawn() -> None:
        nonlocal made
        actor = make_actor()
        made += 1
        pending[actor.__ray_ready__.remote()] = (actor, time.monotonic())

    def feed() -> None:
        while todo and idle:
            actor = idle.popleft()
            attack, chunk = todo.popleft()
            inflight[actor.run.remote(attack, chunk)] = (actor, attack, chunk)

    for _ in range(workers):
        spawn()
    try:
        while todo or inflight:
            ready, _ = ray.wait([*inflight, *pending], num_returns=1, timeout=POLL_S)
            now = time.monotonic()
            for ref in ready:
                if ref in pending:
                    actor, _ = pending.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayActorError:
                        continue  # died while starting (its node lost): replaced below if none is left
                    live.append(actor)
                    idle.append(actor)
                    continue
                actor, attack, chunk = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                    lost += 1  # a lost worker (its node died): the unit goes back to the queue, a new worker starts
                    if lost > 2 * workers:
                        raise RuntimeError(f"evaluation workers kept dying ({lost} lost): {exc}") from None
                    say(f"a worker was lost ({type(exc).__name__}); batch {chunk} of {attack} goes back to the queue")
                    live.remove(actor)
                    todo.appendleft((attack, chunk))
                    spawn()
                    continue
                except ray.exceptions.RayTaskError as exc:
                    raise exc.as_instanceof_cause() from None
                on_result(attack, chunk, result, len(live))
                ran += 1
                idle.append(actor)
            feed()
            if live:
                late = [(ref, a) for ref, (a, since) in pending.items() if now - since > PLACE_LIMIT_S]
                for ref, actor in late:  # others run its share
                    pending.pop(ref)
                    ray.kill(actor)
                if late:
                    say(f"{len(late)} worker{'s' if len(late) > 1 else ''} could not be placed within {PLACE_LIMIT_S:g}s "
                        f"({resources.held_by(('CPU', 'GPU'))}); going on with {len(live)}")
            elif not pending and (todo or inflight):
                spawn()  # every worker was lost: start another
            elif not live:
                waited = now - start
                if waited > worker_wait:
                    raise WorkersUnavailable(
                        f"no evaluation worker ({need}) could be placed in {_seconds(waited)} (--worker-wait "
                        f"{worker_wait:g}): {resources.held_by(('CPU', 'GPU'))}")
                if now - last_line >= WAIT_LINE_S:
                    last_line = now
                    say(f"waiting {_seconds(waited)} for a worker ({need}); {resources.held_by(('CPU', 'GPU'))}; "
                        f"giving up after {_seconds(worker_wait)} (--worker-wait)")
    finally:
        for actor in [*live, *(a for a, _ in pending.values())]:
            ray.kill(actor)
    return ran
