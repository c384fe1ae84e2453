"""Watching a Ray Train run from its controller: lost nodes, waiting for workers, giving up, Ctrl-C.

Ray Train's controller (an actor on the driver's node) restarts the worker group after a failure
and, while the group's resources are missing, retries its start every
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` seconds without end, logging each timeout's traceback.
:class:`RunWatch` is a controller callback (Ray Train's ``ControllerCallback`` hooks, run inside
the controller) that decides instead:

* **Failures.** Ray retries every worker-group failure (``FailureConfig(max_failures=-1)``); the
  watch counts them against ``--max-failures`` itself, except a *lost worker*: a worker whose
  process can no longer be reached (its node died, or the process was killed) after the group
  had written a checkpoint (the run's storage holds a newer one than when the group started).
  That is capacity lost, not an error of the training: the group restarts from the last
  checkpoint on what is left (``--workers MIN-MAX``: with fewer workers, at least MIN; a fixed
  count: once the resources are back). Errors raised by the training code count, and so does a
  lost worker without a checkpoint since the group started (a worker killed again and again, e.g.
  out of memory, gives up instead of looping). Past ``--max-failures`` the run ends with the
  worker group's error.
* **Waiting.** While the group is not running (starting, restarting, waiting for resources) the
  watch prints one line a minute: how long it waited, for which workers, what the cluster has
  free. Past ``--worker-wait`` seconds it ends the run (:class:`WorkerWaitExceeded`); the last
  checkpoint stays, and a relaunch with the same ``--name`` resumes it.
* **Quiet.** Ray's console tracebacks of what the watch reports in one line (each start timeout,
  a lost worker's failed shutdown, the watch's own decision) are dropped; Ray's log files keep them.

:func:`fit` runs ``trainer.fit()`` so that Ctrl-C stops the run at once: Ray Train's own SIGINT
handler (installed when ``fit`` runs in the main thread) waits for the controller, which can be
blocked for a minute in a start attempt, and needs three presses; here ``fit`` runs in a helper
thread, Ctrl-C raises KeyboardInterrupt in the main thread, and the driver's Ray session ends, which
ends the run's controller and workers with it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

WAIT_LINE_INTERVAL_S = 60.0  # one "waiting" line a minute
PING_TIMEOUT_S = 10.0  # a worker that does not answer within this is lost
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's (its _internal/constants.py)


class WorkerWaitExceeded(RuntimeError):
    """The run waited ``--worker-wait`` seconds for the resources of its workers and gave up."""


def start_timeout(worker_wait: float) -> float:
    """Seconds of each of Ray's worker-group start attempts (Ray's default: 60): a quarter of
    ``--worker-wait`` within [2, 15]. An attempt that cannot be placed is given up and decided again: an
    elastic run sized on a stale view of the cluster (a node just lost) tries again on a fresh one after
    15 s, not a minute, and a run gives up at most a quarter of its limit late."""
    return min(15.0, max(2.0, worker_wait / 4))


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class RunWatch(ControllerCallback, WorkerGroupCallback):
    """The controller-side watch of one run (see the module docstring). Built on the driver from the
    run's ``Placement`` and the resources of one worker; pickled into the controller."""

    def __init__(self, placement, resources: dict[str, float]):
        self.max_failures = placement.max_failures
        self.worker_wait = placement.worker_wait
        self.workers = placement.workers
        self.min_workers = placement.min_workers if placement.elastic else placement.workers
        self.resources = dict(resources)
        self.run_uri = placement.run_dir()  # where the run's checkpoints are
        self.failures = 0  # failures counted against max_failures
        self.group: list = []  # the running group's Worker objects
        self.start_epoch = -1  # the newest checkpoint in storage when the group started
        self.lost = False  # whether the group's last failure lost a worker
        self.down_since: float | None = None  # since when no worker group runs
        self.last_line = float("-inf")  # when the last "waiting" line was printed

    # ------------------------------------------------------------------ in the controller
    def after_controller_start(self, train_run_context) -> None:
        os.environ.setdefault(START_TIMEOUT_ENV, str(start_timeout(self.worker_wait)))  # read by each new worker group
        quiet = _QuietConsole()
        for handler in logging.getLogger("ray.train").handlers:
            if not hasattr(handler, "get_log_file_path"):  # the console, not Ray Train's log files
                handler.addFilter(quiet)
        self.down_since = time.monotonic()

    def after_worker_group_start(self, worker_group) -> None:
        self.group, self.start_epoch, self.lost = list(worker_group.get_workers()), self._newest_checkpoint(), False

    def _newest_checkpoint(self) -> int:
        """The epochs of the newest checkpoint in the run's storage (persisted, whether Ray registered it or not)."""
        from . import storage

        try:
            return max((epochs for epochs, _ in storage.checkpoint_dirs(self.run_uri)), default=-1)
        except Exception:  # storage out of reach: no progress can be told
            return -1

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        errors = worker_group_status.errors
        if errors and self.group:
            self.lost = any(_unreachable(e) for e in errors.values()) or self._unanswered(
                [w for rank, w in enumerate(self.group) if rank not in errors])

    def _unanswered(self, workers: list) -> bool:
        """Whether one of ``workers`` (ranks that raised nothing: they may be the lost ones, the others
        failing in a collective with them) no longer answers."""
        import ray

        if not workers:
            return False
        pings = [w.actor.__ray_ready__.remote() for w in workers]
        done, pending = ray.wait(pings, num_returns=len(pings), timeout=PING_TIMEOUT_S)
        if pending:
            return True
        for ref in done:
            try:
                ray.get(ref)
            except Exception:
                return True
        return False

    def after_controller_state_update(self, previous_state, current_state) -> None:
        from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState

        now = time.monotonic()
        if isinstance(current_state, RunningState):
            self.down_since = None
            return
        if current_state.is_terminal():
            return
        if self.down_since is None:
            self.down_since = now
        if isinstance(current_state, RestartingState) and previous_state is not current_state:
            self._count(current_state.training_failed_error)
        self._check_wait(now)
        if current_state is previous_state:  # nothing to do yet (an elastic group below MIN): Ray asks again at once
            time.sleep(1.0)

    def _count(self, error: Exception) -> None:
        """A worker-group failure: free when it lost a worker after a checkpoint, else counted."""
        from ray.train.v2.api.exceptions import WorkerGroupError

        if not isinstance(error, WorkerGroupError):  # a preemption (Ray's own, never counted)
            return
        if self.lost and self._newest_checkpoint() > self.start_epoch:
            then = (f"goes on with as many of its {self._what()} as there is room for" if self.min_workers < self.workers
                    else f"goes on when there is room for its {self._what()} again")
            print(f"[raydistill] a worker was lost (its node died or its process was killed): the run {then}, "
                  f"from its last checkpoint", flush=True)
            return
        self.failures += 1
        if self.failures > self.max_failures:
            raise error

    def _check_wait(self, now: float) -> None:
        waited = now - self.down_since
        if waited > self.worker_wait:
            raise WorkerWaitExceeded(
                f"waited {_seconds(waited)} (--worker-wait {self.worker_wait:g}) for the resources of {self._what()}; "
                f"{self._free()}: a node was lost or the cluster is too small. The last checkpoint is kept: "
                f"relaunch with the same --name to resume (with --workers MIN-MAX it goes on with fewer workers)")
        if waited >= min(WAIT_LINE_INTERVAL_S, start_timeout(self.worker_wait)) and now - self.last_line >= WAIT_LINE_INTERVAL_S:
            self.last_line = now
            print(f"[raydistill] waiting {_seconds(waited)} for the resources of {self._what()}; {self._free()}; "
                  f"giving up after {_seconds(self.worker_wait)} (--worker-wait)", flush=True)

    def _what(self) -> str:
        each = ", ".join(f"{k} {v:g}" for k, v in self.resources.items())
        count = f"{self.workers}" if self.min_workers == self.workers else f"{self.min_workers}-{self.workers}"
        return f"{count} workers ({each} each)"

    def _free(self) -> str:
        import ray

        try:
            free, nodes = ray.available_resources(), sum(1 for n in ray.nodes() if n.get("Alive"))
        except Exception:  # the cluster's state is only for the message
            return "the cluster's free resources are unknown"
        have = ", ".join(f"{k} {free.get(k, 0.0):g}" for k in self.resources)
        return f"the cluster has {have} free on {nodes} node{'s' if nodes != 1 else ''}"


def _unreachable(error: Exception) -> bool:
    """Whether a worker's error says its process could not be reached (dead, or its node gone)."""
    from ray.exceptions import RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    if isinstance(error, WorkerHealthCheckFailedError):
        error = error.health_check_failure
    return isinstance(error, (RayActorError, WorkerHealthCheckTimeoutError))


class _QuietConsole(logging.Filter):
    """Drops the console records of what the watch reports itself (Ray's log files keep them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ray.exceptions import RayActorError
        from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (WorkerGroupStartupTimeoutError, WorkerWaitExceeded, RayActorError)):
            return False  # each start attempt that timed out; the shutdown of a lost worker; giving up
        return f"from callback '{RunWatch.__name__}'" not in record.getMessage()  # the watch's decision to end the run


# ----------------------------------------------------------------------------- on the driver
def fit(trainer) -> Any:
    """``trainer.fit()``, stopped within seconds by Ctrl-C (see the module docstring): the
    KeyboardInterrupt ends this driver's Ray session (the run's controller and workers) and propagates."""
    import ray

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="raydistill-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        ray.shutdown()
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]
