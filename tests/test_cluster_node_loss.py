"""Node loss, elastic workers, waiting for workers and Ctrl-C.

Fast: ``--workers N | MIN-MAX`` and ``--worker-wait`` in the option table; the watch's decisions (raydistill.watch:
which failures count, when it waits and gives up) on Ray Train's own state and error objects; MLflow statuses.
Slow: a real 2-node Ray cluster (tests/cluster.py, S3 storage on moto's server) whose second node's raylet is
killed while every rank is mid-epoch (tests/loop_hooks.py PauseOnce), and a Ctrl-C on a healthy run.
"""
from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, assert_one_error_line, cli

from raydistill import tracking
from raydistill.config import build_config
from raydistill.engine import progress_line
from raydistill.errors import UsageError
from raydistill.train import parser, root_cause
from raydistill.watch import RunWatch, WorkerWaitExceeded, _unreachable, start_timeout


def config(*argv: str):
    return build_config("pgd_at", parser().parse_args(["pgd_at", "--dataset", "digits", *argv]))


# ----------------------------------------------------------------------------- the options
def test_workers_is_a_count_or_an_elastic_range_and_worker_wait_a_time():
    p = config("--workers", "1-2").placement
    assert (p.min_workers, p.workers, p.elastic, list(p.worker_counts())) == (1, 2, True, [1, 2])
    p = config("--workers", "2").placement
    assert (p.min_workers, p.workers, p.elastic, list(p.worker_counts())) == (None, 2, False, [2])
    p = config("--workers", "0").placement
    assert p.in_process and not p.elastic and p.worker_wait == 600.0
    assert config("--worker-wait", "30").placement.worker_wait == 30.0
    for bad in ("2-1", "0-2", "1-", "a-b", "-1", "1-2-3"):
        with pytest.raises(UsageError, match="--workers"):
            config("--workers", bad)
    with pytest.raises(UsageError, match="--worker-wait"):
        config("--worker-wait", "0")
    # the global batch is split evenly over every count the run may have
    with pytest.raises(UsageError, match=r"--batch-size 64 is not divisible by 3"):
        config("--workers", "1-4", "--batch-size", "64")
    assert config("--workers", "2-4", "--batch-size", "96").placement.worker_counts() == range(2, 5)


def test_a_bad_worker_range_is_one_error_line_and_no_run(workdir):
    proc = cli("train", "pgd_at", "--workers", "1-3", "--batch-size", "64", "--storage-path", str(workdir / "runs"),
               "--tracking-uri", f"sqlite:///{workdir}/mlflow.db", timeout=300)
    assert_one_error_line(proc, "--batch-size 64 is not divisible by 3")
    assert not (workdir / "mlflow.db").exists() and not any((workdir / "runs").iterdir())


def test_the_progress_line_shows_the_worker_count():
    m = {"train/loss_ce": 0.5, "val/clean_acc": 0.9, "train/images_per_s": 100.0, "train/epoch_time_s": 2.0}
    assert "100 img/s on 2 workers |" in progress_line(0, 3, {**m, "train/workers": 2.0})
    assert "100 img/s on 1 worker |" in progress_line(0, 3, {**m, "train/workers": 1.0})


# ----------------------------------------------------------------------------- the watch's decisions
def _watch(*argv: str) -> RunWatch:
    return RunWatch(config(*argv).placement, {"CPU": 2.0})


def _failure(*errors: Exception):
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("boom", dict(enumerate(errors)))


def test_a_lost_worker_after_a_checkpoint_is_free_and_training_errors_count(tmp_path, capsys):
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState

    lost = WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError())
    assert _unreachable(lost) and not _unreachable(RuntimeError("Connection closed by peer"))
    w = _watch("--workers", "1-2", "--max-failures", "1", "--storage-path", str(tmp_path), "--name", "r")
    running = RunningState()

    def group_starts(lost_worker: bool) -> None:  # what after_worker_group_start and a failed poll set
        w.start_epoch, w.lost = w._newest_checkpoint(), lost_worker
        w.after_controller_state_update(None, running)

    group_starts(True)
    (tmp_path / "r" / "checkpoint_000002").mkdir(parents=True)  # the group wrote a checkpoint; then a node died
    w.after_controller_state_update(running, RestartingState(_failure(RuntimeError("collective"), lost)))
    assert w.failures == 0 and "a worker was lost" in capsys.readouterr().out
    group_starts(False)  # an error of the training code: counted, the first one allowed
    w.after_controller_state_update(running, RestartingState(_failure(ValueError("bug"))))
    assert w.failures == 1
    group_starts(True)  # lost again before any new checkpoint: counted, over --max-failures: the run ends
    again = _failure(lost)
    with pytest.raises(type(again)) as info:
        w.after_controller_state_update(running, RestartingState(again))
    assert info.value is again and w.failures == 2


def test_waiting_prints_a_line_a_minute_and_gives_up_after_worker_wait(capsys):
    from ray.train.v2._internal.execution.controller.state import ReschedulingState, RunningState

    w = _watch("--workers", "2", "--worker-wait", "100")
    assert start_timeout(100) == 15 and start_timeout(10) == 2.5 and start_timeout(4) == 2
    waiting = ReschedulingState(_failure(RuntimeError("start timed out")))
    w.down_since = time.monotonic() - 30
    w.after_controller_state_update(None, waiting)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[raydistill] waiting 30s for the resources of 2 workers (CPU 2 each)")
    w.after_controller_state_update(None, waiting)  # less than a minute since the last line: quiet
    assert capsys.readouterr().out == ""
    w.after_controller_state_update(None, RunningState())  # running again: the clock restarts
    assert w.down_since is None
    w.after_controller_state_update(None, waiting)
    w.down_since = time.monotonic() - 101
    with pytest.raises(WorkerWaitExceeded, match=r"waited 1m41s \(--worker-wait 100\) for the resources of 2 workers"):
        w.after_controller_state_update(None, waiting)


def test_the_reason_of_a_run_the_watch_ended_reaches_the_driver_in_one_line():
    from ray.train.v2.api.exceptions import ControllerError

    ended = pickle.loads(pickle.dumps(ControllerError(WorkerWaitExceeded("waited 41s (--worker-wait 40) for ..."))))
    assert root_cause(ended) == "WorkerWaitExceeded: waited 41s (--worker-wait 40) for ..."


# ----------------------------------------------------------------------------- MLflow statuses
def test_a_stale_driver_never_overwrites_a_run_another_driver_finished(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.open_run(uri, "e", "r", tracking.KIND_RUN, tags={"method": "pgd_at"})
    tracking.close_run(uri, run_id, "KILLED", reason="interrupted")  # Ctrl-C
    assert tracking.open_run(uri, "e", "r", tracking.KIND_RUN) == run_id  # the relaunch finishes it
    tracking.close_run(uri, run_id, "FINISHED")
    for status in ("FAILED", "KILLED"):  # the first driver, still waiting for its workers, ends later
        tracking.close_run(uri, run_id, status, reason="stale")
        run = tracking.client(uri).get_run(run_id)
        assert run.info.status == "FINISHED" and tracking.FAILURE_TAG not in run.data.tags


# ----------------------------------------------------------------------------- a real 2-node cluster
@pytest.fixture(scope="module")
def cluster(cluster2):
    """The session's 2 nodes of 1 CPU (a 2-worker run puts one worker on each, one thread each: 2 cores are not
    oversubscribed) and its S3 bucket for the runs (tests/conftest.py, cluster2); the tests here lose nodes, so
    the module leaves the cluster with 2 live nodes again."""
    ray = cluster2.ray
    ray.s3 = cluster2.s3
    yield ray
    ray.restore(2)


@pytest.fixture
def two_nodes(cluster):
    """The cluster with 2 live nodes again (a test before may have lost one)."""
    cluster.restore(2)
    return cluster


@pytest.fixture(autouse=True)
def no_driver_left():
    """A test that failed half-way leaves no driver running (its run would hold the cluster)."""
    yield
    for d in Driver.started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
    Driver.started.clear()


def _ctrl_c_as_at_a_terminal() -> None:
    """A suite started in the background (``cmd &``) hands its children SIGINT ignored, and Python then never
    raises KeyboardInterrupt: the driver gets SIGINT's default, as a command typed at a terminal does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Driver:
    """``python -m raydistill.train`` on the cluster, as a user runs it (hooks as in conftest.train_with_hooks)."""

    started: list["Driver"] = []

    def __init__(self, cluster, workdir, name: str, *args: str, hooks=()):
        stamp = time.monotonic_ns()
        self.out, self.err = workdir / f"{name}-{stamp}.out", workdir / f"{name}-{stamp}.err"
        self.uri = f"sqlite:///{workdir}/mlflow.db"
        code = ("import pickle, sys; from raydistill.errors import cli_entry; from raydistill.train import main; "
                "hooks = pickle.loads(bytes.fromhex(sys.argv[1])); cli_entry(lambda argv: main(argv, hooks=hooks))(sys.argv[2:])")
        argv = ["pgd_at", "--preset", "quickstart", "--test-attacks", "clean", "--storage-path", cluster.s3.uri("runs"),
                "--tracking-uri", self.uri, "--name", name, *args]
        self.proc = subprocess.Popen([sys.executable, "-c", code, pickle.dumps(list(hooks)).hex(), *argv],
                                     stdout=open(self.out, "w"), stderr=open(self.err, "w"), cwd=str(REPO),
                                     env=cluster.env, preexec_fn=_ctrl_c_as_at_a_terminal)
        Driver.started.append(self)

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)

    def wait_for(self, *paths, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not all(p.exists() for p in paths):
            assert self.proc.poll() is None, f"the run ended (rc {self.proc.returncode}) first:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"{paths} never appeared:\n{self.text()[-3000:]}"
            time.sleep(0.3)

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def errors(self) -> list[str]:
        return [ln for ln in self.err.read_text().splitlines() if ln.startswith("error:")]

    def run(self):
        from mlflow.tracking import MlflowClient

        c = MlflowClient(self.uri)
        exp = c.get_experiment_by_name("raydistill")
        return c.search_runs([exp.experiment_id], f"tags.`{tracking.NAME_TAG}` = '{self.name_of()}'")[0]

    def name_of(self) -> str:
        return self.proc.args[self.proc.args.index("--name") + 1]

    def per_epoch(self, key: str) -> dict[int, float]:
        from mlflow.tracking import MlflowClient

        hist = MlflowClient(self.uri).get_metric_history(self.run().info.run_id, key)
        steps = [m.step for m in hist]
        assert len(steps) == len(set(steps)), f"{key}: an epoch logged twice: {sorted(steps)}"
        return {m.step: m.value for m in hist}


def lose_node_mid_epoch(cluster, run: Driver, pause) -> float:
    """Once every rank of ``run`` waits in its PauseOnce, kill the newest node's raylet, then let the ranks go on."""
    run.wait_for(pause / "rank0", pause / "rank1")
    cluster.kill_node(len(cluster.nodes) - 1)
    (pause / "go").write_text("")
    return time.monotonic()


@pytest.mark.slow
def test_an_elastic_run_goes_on_with_the_workers_left_and_grows_back(two_nodes, tmp_path):
    """--workers 1-2: the second node is lost halfway through epoch 2; the run trains epoch 2 again on the one
    worker left and, once a new node has joined, grows back to 2 workers (while its rank 0 holds at epoch 3)."""
    from loop_hooks import HoldWhileFewer, PauseOnce

    pause = tmp_path / "pause"
    run = Driver(two_nodes, tmp_path, "elastic", "--workers", "1-2", "--epochs", "4",
                 hooks=[PauseOnce(pause, epoch=1), HoldWhileFewer(epoch=2, workers=2)])
    lose_node_mid_epoch(two_nodes, run, pause)
    deadline = time.monotonic() + 300
    while "epoch 2/4" not in run.out.read_text():  # trained again, on the worker left
        assert run.proc.poll() is None and time.monotonic() < deadline, run.text()[-3000:]
        time.sleep(0.5)
    two_nodes.start_node()  # capacity returns
    assert run.wait() == 0, run.text()[-4000:]
    out = run.text()
    workers = run.per_epoch("train/workers")
    print(f"workers per epoch: {workers}")
    assert sorted(run.per_epoch("val/pgd10_acc")) == [0, 1, 2, 3]  # every epoch exactly once
    assert workers == {0: 2, 1: 1, 2: 2, 3: 2}, out[-3000:]  # epoch 2 lost on 2 workers, trained on 1; then 2 again
    assert "a worker was lost" in out and "on 1 worker |" in out and "resumed from epoch 2" in out
    assert run.run().info.status == "FINISHED" and run.errors() == []


@pytest.mark.slow
def test_a_fixed_run_waits_for_its_workers_gives_up_and_a_relaunch_finishes_it(two_nodes, tmp_path):
    from loop_hooks import PauseOnce

    pause, wait_s = tmp_path / "pause", 20
    run = Driver(two_nodes, tmp_path, "fixed", "--workers", "2", "--epochs", "3", "--worker-wait", str(wait_s),
                 hooks=[PauseOnce(pause, epoch=1)])
    lost_at = lose_node_mid_epoch(two_nodes, run, pause)
    assert run.wait() == 1, run.text()[-4000:]
    took, out = time.monotonic() - lost_at, run.text()
    print(f"gave up {took:.0f}s after the node was lost (--worker-wait {wait_s})")
    assert took < wait_s + 60, out[-3000:]
    assert len(run.errors()) == 1 and f"(--worker-wait {wait_s}) for the resources of 2 workers" in run.errors()[0]
    assert "[raydistill] waiting" in out and "WorkerGroupStartupTimeoutError" not in out, out[-3000:]
    mlflow_run = run.run()
    assert mlflow_run.info.status == "FAILED" and "worker-wait" in mlflow_run.data.tags[tracking.FAILURE_TAG]
    again = Driver(two_nodes, tmp_path, "fixed", "--workers", "1", "--epochs", "3")
    assert again.wait() == 0, again.text()[-4000:]
    assert "resumed from epoch 1" in again.text()
    mlflow_run = again.run()
    assert mlflow_run.info.status == "FINISHED" and tracking.FAILURE_TAG not in mlflow_run.data.tags
    assert sorted(again.per_epoch("val/pgd10_acc")) == [0, 1, 2]


@pytest.mark.slow
def test_ctrl_c_stops_a_run_within_seconds_as_killed_and_a_relaunch_finishes_it(cluster, tmp_path):
    from loop_hooks import PauseOnce

    pause, free = tmp_path / "pause", cluster.available("CPU")
    run = Driver(cluster, tmp_path, "ctrlc", "--workers", "1", "--epochs", "2",
                 hooks=[PauseOnce(pause, epoch=1, timeout=30)])
    run.wait_for(pause / "rank0")
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(timeout=120) == 130, run.text()[-3000:]
    took = time.monotonic() - t0
    print(f"exited {took:.1f}s after one Ctrl-C")
    assert took < 20 and run.errors() == ["error: interrupted"], run.text()[-3000:]
    assert run.run().info.status == "KILLED"
    deadline = time.monotonic() + 30  # the run's worker is gone too: its CPUs are free again
    while cluster.available("CPU") < free:
        assert time.monotonic() < deadline, "the run's worker still holds its CPUs"
        time.sleep(1)
    again = Driver(cluster, tmp_path, "ctrlc", "--workers", "1", "--epochs", "2")
    assert again.wait() == 0, again.text()[-4000:]
    mlflow_run = again.run()
    assert mlflow_run.info.status == "FINISHED" and tracking.FAILURE_TAG not in mlflow_run.data.tags
    assert sorted(again.per_epoch("val/pgd10_acc")) == [0, 1]
