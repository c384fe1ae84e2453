"""Ray Train's overhead: the steady-state epoch time of a 1-worker TorchTrainer run against the
in-process loop, each run in a fresh process; against a plain single-process PyTorch loop over the same
tensors (``plain``: the limit); and an idle Ray instance beside the in-process loop, with the CPU time its
process tree takes from the machine (read from /proc)."""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from .configs import Bench
from .plain import plain_epoch_times


def _epoch_times(config: dict) -> tuple[list[float], float]:
    """Launch one run (in a fresh process): its train/epoch_time_s per epoch and its wall time (s)."""
    from ..checkpoint import STATE_FILE, safe_load
    from ..train import launch

    t0 = time.perf_counter()
    summary = launch(TrainConfig.from_dict(config), quiet=True)
    wall = time.perf_counter() - t0
    return [h["train/epoch_time_s"] for h in safe_load(Path(summary["checkpoint"]) / STATE_FILE)["history"]], wall


def _idle_ray(ready: str, stop: str) -> None:
    """A local Ray instance running a 1-worker TorchTrainer (holding all CPUs) whose function only
    waits: every process a Ray run has (daemons, controller, Ray Train's helper actors, the worker),
    none of them working. The function touches ``ready`` once it runs and returns once ``stop`` exists."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..train import cpus_each, init_ray

    def wait(_config: dict) -> None:
        Path(ready).touch()
        while not os.path.exists(stop):
            time.sleep(0.5)

    init_ray(log_to_driver=False)
    cpus = float(cpus_each(1))  # all of them, as a 1-worker run holds
    TorchTrainer(wait, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name="idle-ray", storage_path=os.path.join(os.path.dirname(ready), "ray"))).fit()


def process_tree_ticks(root: int) -> dict[int, int] | None:
    """CPU time (user + system, in clock ticks) used so far by process ``root`` and by each of its
    living descendants, by pid; None where there is no /proc (not Linux)."""
    if not os.path.isdir("/proc"):
        return None
    procs: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
            procs[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    tree, frontier = {root}, {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier} - tree
        tree |= frontier
    return {pid: procs[pid][1] for pid in tree if pid in procs}


class IdleRay:
    """``with IdleRay(workdir):`` an idle Ray instance (``_idle_ray``) runs beside the block, in its own
    process, from the moment its worker runs plus ``settle_s`` (its daemons' start-up burst) to the
    block's end. After the block ``cpu_pct`` is the CPU time its processes (that process and all its
    descendants: GCS, raylet, dashboard, agents, controller, Ray Train's helpers, the waiting worker)
    used during the block, as a percentage of all this machine's CPUs over the block's wall time
    (None without /proc): the share of the machine Ray takes from whatever runs beside it."""

    def __init__(self, workdir: str, settle_s: float = 15.0, timeout_s: float = 180.0):
        self.dir = tempfile.mkdtemp(prefix="idle-ray-", dir=workdir)
        self.ready, self.stop = os.path.join(self.dir, "ready"), os.path.join(self.dir, "stop")
        self.settle_s, self.timeout_s = settle_s, timeout_s
        self.cpu_pct: float | None = None
        self._ticks: dict[int, int] | None = None

    def __enter__(self) -> "IdleRay":
        import multiprocessing

        self.proc = multiprocessing.get_context("spawn").Process(target=_idle_ray, args=(self.ready, self.stop))
        self.proc.start()
        deadline = time.monotonic() + self.timeout_s
        while not os.path.exists(self.ready):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("the idle Ray instance did not start its worker")
            time.sleep(0.5)
        time.sleep(self.settle_s)
        self._ticks, self._t0 = process_tree_ticks(self.proc.pid), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        if self._ticks is not None:  # measured from the end of __enter__
            from ..sessions import usable_cpus

            ticks = process_tree_ticks(self.proc.pid) or {}
            used_s = sum(t - self._ticks.get(pid, 0) for pid, t in ticks.items()) / os.sysconf("SC_CLK_TCK")
            self.cpu_pct = 100 * used_s / (usable_cpus() * (time.monotonic() - self._t0))
        Path(self.stop).touch()
        self.proc.join(self.timeout_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


def ray_overhead(bench: Bench, method: str) -> dict[str, Any]:
    """Steady-state train/epoch_time_s of a 1-worker TorchTrainer run and of the in-process loop, same
    config (an epoch = ``--steps`` batches). ``--rounds`` pairs of runs, each run in a fresh process,
    the order alternating (in-process then Ray, Ray then in-process, ...: drift cancels). Per run the
    median epoch time over its epochs after the first ``--ray-skip-epochs`` (default: half of them:
    a fresh local Ray instance's daemons start up for ~10-20 s beside the first epochs, a one-off
    cost that is reported as the runs' wall time instead); the overhead is the median over pairs of
    Ray / in-process - 1 (the figure to quote), with the pooled medians beside it.

    With ``--beside-idle-ray`` each round has a third run: the in-process loop while an idle Ray
    instance (``IdleRay``) runs beside it; its slowdown against the plain in-process run is the part of
    the overhead that is Ray's own processes competing for the CPU, not anything in the worker; and
    the CPU time those processes used meanwhile, as a share of the machine's CPUs (``idle_ray_cpu_pct``:
    with the loop on every CPU, the overhead can be no smaller than this share).

    With ``--plain-loop`` each round also runs the plain loop (``bench.plain``: the same tensors, network,
    optimiser and passes, written out in plain PyTorch, no Ray) with the same epochs; ``ray_vs_plain`` is the
    median over rounds of plain / Ray epoch time, i.e. the production loop's throughput under Ray Train as a
    fraction of the plain loop's (goal >= 0.9), ``in_process_vs_plain`` the same for the in-process loop. On a
    real dataset (``--dataset fashion_mnist``) an epoch is the whole training split (or ``--train-size``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    a = bench.args
    skip = a.ray_skip_epochs if a.ray_skip_epochs is not None else a.ray_epochs // 2
    modes = ("in_process", "beside_idle_ray", "ray") if a.beside_idle_ray else ("in_process", "ray")
    modes += ("plain",) if a.plain_loop else ()
    out: dict[str, Any] = {"skipped_epochs": skip, "pair_overheads_pct": [],
                           **{m: {"epoch_times_s": [], "run_medians_s": [], "run_walls_s": []} for m in modes}}
    if a.beside_idle_ray:
        out["pair_beside_idle_ray_pct"], out["idle_ray_cpu_pcts"] = [], []
    if a.plain_loop:
        out["pair_ray_vs_plain"], out["pair_in_process_vs_plain"] = [], []
    for r in range(a.rounds):
        pair = {}
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            cfg = bench.config(method, in_process=mode != "ray", workers=1, epochs=a.ray_epochs, lr_milestones=[],
                               swa_start=None, test_attacks=["clean"], val_size=2 * bench.num_classes,
                               name=f"bench-{r}-{mode}", tracking_uri=f"sqlite:///{bench.workdir}/mlflow.db")
            beside = IdleRay(bench.workdir) if mode == "beside_idle_ray" else contextlib.nullcontext()
            with beside, ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                times, wall = pool.submit(plain_epoch_times if mode == "plain" else _epoch_times, cfg.to_dict()).result()
            steady = times[skip:]
            out[mode]["epoch_times_s"] += steady
            out[mode]["run_walls_s"].append(wall)
            pair[mode] = statistics.median(steady)
            if mode == "beside_idle_ray":
                out["idle_ray_cpu_pcts"].append(beside.cpu_pct)
            out[mode]["run_medians_s"].append(pair[mode])
        out["pair_overheads_pct"].append(100 * (pair["ray"] / pair["in_process"] - 1))
        beside_text = ""
        if a.beside_idle_ray:
            out["pair_beside_idle_ray_pct"].append(100 * (pair["beside_idle_ray"] / pair["in_process"] - 1))
            beside_text = f", in-process beside idle Ray {pair['beside_idle_ray']:.3f}s = {out['pair_beside_idle_ray_pct'][-1]:+.1f}%"
            if out["idle_ray_cpu_pcts"][-1] is not None:
                beside_text += f" (idle Ray's processes: {out['idle_ray_cpu_pcts'][-1]:.1f}% of the CPUs)"
        if a.plain_loop:
            for key, mode in (("pair_ray_vs_plain", "ray"), ("pair_in_process_vs_plain", "in_process")):
                out[key].append(pair["plain"] / pair[mode])
            beside_text += (f", plain loop {pair['plain']:.3f}s: Ray at x{out['pair_ray_vs_plain'][-1]:.3f} of its "
                            f"throughput, in-process x{out['pair_in_process_vs_plain'][-1]:.3f}")
        print(f"ray-overhead round {r + 1}/{a.rounds}: in-process {pair['in_process']:.3f}s, "
              f"Ray {pair['ray']:.3f}s per epoch = {out['pair_overheads_pct'][-1]:+.1f}%{beside_text} (run walls: in-process "
              f"{out['in_process']['run_walls_s'][-1]:.1f}s, Ray {out['ray']['run_walls_s'][-1]:.1f}s)", flush=True)
    for mode in modes:
        out[mode]["epoch_time_s"] = statistics.median(out[mode]["epoch_times_s"])
    out["pooled_overhead_pct"] = 100 * (out["ray"]["epoch_time_s"] / out["in_process"]["epoch_time_s"] - 1)
    out["overhead_pct"] = statistics.median(out["pair_overheads_pct"])
    if a.beside_idle_ray:
        out["beside_idle_ray_pct"] = statistics.median(out["pair_beside_idle_ray_pct"])
        shares = [c for c in out["idle_ray_cpu_pcts"] if c is not None]
        out["idle_ray_cpu_pct"] = statistics.median(shares) if shares else None
    if a.plain_loop:
        out["ray_vs_plain"] = statistics.median(out["pair_ray_vs_plain"])
        out["in_process_vs_plain"] = statistics.median(out["pair_in_process_vs_plain"])
        out["target_vs_plain"] = 0.9
    out["target_pct"] = 5.0
    return out
