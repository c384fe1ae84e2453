"""The training-throughput benchmark, and the minimal passes of every method's step.

* Forward / backward passes per network in one production step equal what each method's equations
  need (METHODS.md, "Cost per training step"), with and without the speed features: a redundant
  pass anywhere fails here.
* The authors'-code PeerAiD step (the baseline of the speed targets) makes the same update as ours
  with one student forward and backward more.
* The command writes the contract's JSON, races alternate their contestants, bad input is one
  ``error:`` line.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.reference.peeraid_authors import authors_peeraid_step
from raydistill import fastpath
from raydistill.bench import checks, cli as bench_cli, configs, overhead, races, throughput
from raydistill.bench.measure import run_steps
from raydistill.errors import UsageError

from conftest import assert_one_error_line, cli

K, M = 2, 2  # PGD steps of the training attack; SVGD iterations of AT-AKA / CAT-AKA (3 networks)
TINY = ["--student", "small_cnn", "--image-size", "8", "--batch-size", "4", "--steps", "1", "--warmup", "1",
        "--attack-steps", str(K), "--eval-examples", "8", "--threads", "1"]

# (forward, backward) per network per step. The attack: K x (f + b) of each network it differentiates.
PASSES = {
    "natural": {"student": (1, 1)},
    "pgd_at": {"student": (K + 1, K + 1)},  # attack, S(x*)
    "trades": {"student": (K + 3, K + 2)},  # eval-mode S(x) target (no graph), attack, S(x), S(x*)
    "ard": {"student": (K + 1, K + 1), "teacher": (1, 0)},  # alpha = 1: no S(x); T(x) no graph
    "rslad": {"student": (K + 2, K + 2), "teacher": (1, 0)},  # T(x) once: attack target and both terms
    "akd2": {"student": (K + 1, K + 1), "teacher": (1, 0), "teacher_nat": (1, 0)},
    "iad1": {"student": (K + 2, K + 2), "teacher": (2, 0)},  # S(x~), S(x); T(x), T(x~) (authors: 4 S f)
    "iad2": {"student": (K + 2, K + 2), "teacher": (1, 0), "teacher_nat": (1, 0)},  # T_at(x~) gives alpha too
    "adaad": {"student": (K + 1, K + 1), "teacher": (K + 1, K)},  # attack through both; T(x*) no graph
    "adaiad": {"student": (K + 2, K + 2), "teacher": (K + 1, K)},  # + S(x) for the introspection
    "peeraid": {"student": (K + 2, K + 2), "peer": (2, 1)},  # S(x*), S(x); P(x) no graph, P(x*)
    "at_aka": {"student": (1, 1), **{f"teacher{i}": (M + 1, M + 1) for i in range(3)}},
    "cat_aka": {f"student{i}": (M + 1, M + 1) for i in range(3)},
}
EVAL_MODE_ATTACKS = {"trades", "pgd_at", "rslad", "adaad", "adaiad", "peeraid", "at_aka", "cat_aka"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: see conftest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> configs.Bench:
    argv = TINY + ["--methods", ",".join(PASSES), "--set", f"svgd_steps={M}"]
    return configs.Bench(bench_cli.parse(argv), str(tmp_path_factory.mktemp("bench")))


def passes_of(b: configs.Bench, method: str, **features):
    runner = b.runner(b.config(method, **features))
    data = runner.batches()
    run_steps(runner.step, data, 1, runner.device)  # folded copies are made in the first step
    return runner, throughput.count_passes(runner, runner.step, data)


def test_flops_per_step_follow_the_passes(tiny):
    """FLOPs of a step (what a GPU's share of its peak is computed from): a forward counts 1 unit, the
    attack's input-gradient backward 1 (no weight gradients), the training backward 2 (input and
    weight gradients). natural: 1 + 2; pgd_at: K x (1 + 1) + 1 + 2."""
    flops = {}
    for method in ("natural", "pgd_at"):
        runner = tiny.runner(tiny.config(method))
        data = runner.batches()
        run_steps(runner.step, data, 1, runner.device)
        flops[method] = throughput.count_flops(runner, runner.step, data)
    assert flops["natural"] > 0
    assert flops["pgd_at"] / flops["natural"] == pytest.approx((2 * K + 3) / 3, rel=0.1)


@pytest.mark.parametrize("method", PASSES)
def test_passes_per_step_are_the_minimum_the_equations_need(tiny, method):
    _, counts = passes_of(tiny, method)
    assert {n: (c["forward"], c["backward"]) for n, c in counts.items()} == PASSES[method]


@pytest.mark.parametrize("method", ["trades", "peeraid", "adaad", "ard", "at_aka"])
def test_speed_features_keep_the_passes_and_attack_the_folded_copy(tiny, method):
    runner, counts = passes_of(tiny, method, **races.FAST)
    assert {n: (c["forward"], c["backward"]) for n, c in counts.items()} == PASSES[method]
    attacked = [n for n, s in runner.specs.items() if s.trainable and fastpath.views_of(runner.network(n))]
    assert bool(attacked) == (method in EVAL_MODE_ATTACKS)  # train()-mode attacks (ARD) stay unfolded


def test_authors_peeraid_step_is_our_update_with_one_more_student_pass(tiny):
    ours, authors = (tiny.runner(tiny.config("peeraid")) for _ in range(2))
    x, y = next(ours.batches())
    x = 0.05 + 0.9 * x  # inside (0, 1): the authors' random start is not clamped, ours is
    ctx = authors.context(0)
    for runner, step in ((ours, ours.step),
                         (authors, lambda a, b: authors_peeraid_step(authors, a, b, ctx))):
        torch.manual_seed(1)
        step(x, y)
    for n in ("student", "peer"):
        for p, q in zip(ours.network(n).parameters(), authors.network(n).parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), n
    counts = throughput.count_passes(authors, lambda a, b: authors_peeraid_step(authors, a, b, ctx),
                                     authors.batches())
    assert counts == {"student": {"forward": K + 3, "backward": K + 3}, "peer": {"forward": 2, "backward": 1}}


def test_race_alternates_and_reports_median_speedups(tiny):
    variants = [races.Variant(name, r, r.step)
                for name, r in (("a", tiny.runner(tiny.config("natural"))),
                                ("b", tiny.runner(tiny.config("natural", precision="bf16"))))]
    out = races.race(variants, steps=1, rounds=3, warmup=1)
    assert out["a"]["speedup"] == 1.0 and len(out["b"]["images_per_s_rounds"]) == 3
    assert all(v["images_per_s"] > 0 for v in out.values())


def test_command_writes_the_contract_json(tmp_path):
    path = tmp_path / "bench.json"
    proc = cli("bench", "--methods", "pgd_at,peeraid", *TINY, "--fold-bn", "--summary-json", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(path.read_text())
    assert {"cpu", "cores", "torch", "device", "bf16"} <= set(out["machine"])
    pgd_at, peeraid = out["results"]
    assert pgd_at["method"] == "pgd_at" and pgd_at["passes"] == {"student": {"forward": K + 1, "backward": K + 1}}
    assert peeraid["passes"]["peer"] == {"forward": 2, "backward": 1} and peeraid["features"]["fold_bn"]
    for r in out["results"]:
        assert r["images_per_s"] > 0 and 0 <= r["data_share"] < 1 and r["peak_mem_mb"] is not None
        assert set(r["eval_images_per_s"]) == {"clean", "pgd20"}


def test_pgd20_check_compares_fp32_and_the_fast_path(tmp_path):
    from raydistill.checkpoint import save_model
    from raydistill.models import build_model

    path = save_model(tmp_path / "ckpt", build_model("small_cnn", 10, (1, 8, 8)), "small_cnn", 10, (1, 8, 8),
                      {"dataset": "digits", "eps": 0.1, "step_size": 0.025})
    out = checks.pgd20_check(str(path), bench_cli.parse(["--pgd20-check", str(path), "--eval-examples", "64"]))
    assert out["dataset"] == "digits" and out["n_examples"] == 64
    assert out["difference_points"] == pytest.approx(100 * (out["pgd20_acc_fast"] - out["pgd20_acc_fp32"]))


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "peeraid,madry"], "unknown method 'madry'"),
    (["--student", "resnet9"], "unknown model 'resnet9'"),
    (["--set", "beta=1", "--methods", "peeraid"], "--set beta"),
    (["--batch-size", "0"], "--batch-size"),
    (["--compile", "max"], "--compile"),
    (["--pgd20-check", "/nonexistent/ckpt"], "does not exist"),
    (["--ray-overhead", "--ray-epochs", "3", "--ray-skip-epochs", "3"], "--ray-skip-epochs 3 leaves none"),
    (["--beside-idle-ray"], "--beside-idle-ray is a part of --ray-overhead"),
    (["--plain-loop", "--methods", "natural"], "--plain-loop is a part of --ray-overhead"),
    (["--ray-overhead", "--plain-loop", "--methods", "trades"], "one of natural, pgd_at (the methods with a plain loop)"),
])
def test_bad_input_is_a_usage_error(argv, needle):
    with pytest.raises(UsageError, match=None) as exc:
        bench_cli.parse(argv)
    assert needle in str(exc.value)


def test_compare_authors_peeraid_without_the_reference_code_is_a_usage_error(monkeypatch, tmp_path):
    """An installed package has no benchmarks/reference: the comparison says so before anything runs."""
    monkeypatch.setattr(races, "REFERENCE", tmp_path / "peeraid_authors.py")
    with pytest.raises(UsageError) as exc:
        bench_cli.parse(["--compare-authors-peeraid"])
    assert "reference" in str(exc.value) and "checkout" in str(exc.value)


def test_bad_input_is_one_error_line():
    assert_one_error_line(cli("bench", "--methods", "madry", timeout=120), "unknown method 'madry'", "peeraid")


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_process_tree_ticks_counts_a_process_and_its_descendants_only():
    """What ``--beside-idle-ray`` sums as Ray's CPU use: a child that burns 0.3 s of CPU and starts a
    grandchild that burns 0.3 s too: both are in the tree with at least that much, and nothing else is."""
    child_code = ("import subprocess, sys\n"
                  f"g = subprocess.Popen([sys.executable, '-c', {BURN + 'print(1, flush=True)' + chr(10) + 'time.sleep(60)'!r}])\n"
                  f"{BURN}print(g.pid, flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", child_code], stdout=subprocess.PIPE, text=True)
    grandchild = None
    try:
        lines = {child.stdout.readline().strip() for _ in range(2)}  # the grandchild's "1" and its pid
        grandchild = int(max(lines, key=len))
        ticks = overhead.process_tree_ticks(child.pid)
        assert set(ticks) == {child.pid, grandchild}
        hz = os.sysconf("SC_CLK_TCK")
        assert all(t >= 0.25 * hz for t in ticks.values()), ticks
        assert set(overhead.process_tree_ticks(grandchild)) == {grandchild}
    finally:
        child.kill()
        if grandchild is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild, signal.SIGKILL)
        child.wait()


@pytest.mark.slow
def test_idle_ray_runs_a_waiting_trainer_beside_the_block_and_stops_it(tmp_path):
    """``--beside-idle-ray``'s instance: inside the block its TorchTrainer worker is up and waiting (a
    process named ray::RayTrainWorker exists and the trainer's controller too); after the block the
    instance's process has ended, and with it its workers."""
    def titles(pids) -> set[str]:  # Ray sets its processes' titles (their cmdline's first word) to ray::CLASS...
        out = set()
        for pid in pids:
            with contextlib.suppress(OSError):
                out.add(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"))
        return out

    with overhead.IdleRay(str(tmp_path), settle_s=0) as idle:
        assert os.path.exists(idle.ready) and idle.proc.is_alive()
        # the CPU share sums over the instance's process tree: its workers and daemons are in it (other Ray
        # instances on the machine are not looked at)
        pids = set(overhead.process_tree_ticks(idle.proc.pid))
        tree = titles(pids)
        for name in ("ray::RayTrainWorker", "ray::TrainController", "ray::PlacementGroupCleaner", "raylet", "gcs_server"):
            assert any(name in t for t in tree), (name, tree)
        time.sleep(2)
    assert idle.cpu_pct is not None and 0 < idle.cpu_pct <= 110, idle.cpu_pct  # ticks round per process
    assert not idle.proc.is_alive() and idle.proc.exitcode == 0
    deadline = time.monotonic() + 30
    while [p for p in pids if Path(f"/proc/{p}").exists()] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not titles(p for p in pids if Path(f"/proc/{p}").exists()), "the instance's processes outlived it"
