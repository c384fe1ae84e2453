"""The CUDA code paths: the precision policy, no host sync in the training step, torch.compile without
per-step graph breaks or per-batch recompiles, checkpoints across devices.

The first part runs on the CPU (the backend flags exist on CPU builds; a sync is counted by patching the
Tensor methods that wait for the device; compiled graphs are counted with dynamo's counters and the
"eager" backend). The ``gpu``-marked part needs CUDA (skipped elsewhere, tests/conftest.py); each test
takes seconds on one GPU: ``pytest -q tests/test_cuda_paths.py -m gpu``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import shutil

import pytest
import torch

from raydistill import fastpath
from raydistill.config import EXPERIMENT_FIELDS, add_run_options, build_config, resolve

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: see conftest

METHODS = ("pgd_at", "trades", "peeraid")


@pytest.fixture(autouse=True)
def backend_flags():
    """Every test gets the process's backend flags back."""
    saved = (*fastpath.tf32_flags(), torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def config(tmp_path, method: str = "pgd_at", **flags):
    """A tiny in-process digits run: small_cnn, 2 attack steps, one thread."""
    base = {"dataset": "digits", "workers": 0, "epochs": 1, "storage_path": str(tmp_path), "name": "t",
            "student": "small_cnn", "batch_size": 32, "attack_steps": 2, "threads": 1}
    return resolve(method, {**base, **flags})


def runner(tmp_path, method: str = "pgd_at", **flags):
    from raydistill.steprunner import StepRunner

    cfg = config(tmp_path, method, **flags)
    return StepRunner(cfg, tmp_path / method)


# ============================================================================= CPU: the precision policy
def test_precision_choices_are_the_policys():
    assert EXPERIMENT_FIELDS["precision"].metadata["choices"] == fastpath.PRECISIONS == ("fp32", "tf32", "bf16")
    p = argparse.ArgumentParser()
    add_run_options(p)
    assert build_config("pgd_at", p.parse_args(["--precision", "tf32"])).precision == "tf32"
    with pytest.raises(SystemExit):
        p.parse_args(["--precision", "fp16"])
    with pytest.raises(ValueError, match="fp16"):
        fastpath.configure_backends("cpu", "fp16")


@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("tf32", True), ("bf16", False)])
def test_configure_backends_sets_the_stated_flags(precision, tf32):
    for start in (True, False):  # whatever the flags were before
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = start
        torch.backends.cudnn.benchmark = False
        out = fastpath.configure_backends(torch.device("cuda"), precision)
        assert fastpath.tf32_flags() == (tf32, tf32)
        assert torch.backends.cudnn.benchmark is True
        assert out == {"cuda_matmul_allow_tf32": tf32, "cudnn_allow_tf32": tf32, "cudnn_benchmark": True}
        torch.backends.cudnn.benchmark = False
        fastpath.configure_backends("cpu", precision)  # a CPU run: the TF32 flags, cudnn.benchmark left alone
        assert fastpath.tf32_flags() == (tf32, tf32) and torch.backends.cudnn.benchmark is False


def test_strict_fp32_turns_tf32_off_and_restores_it():
    for matmul, conv in ((True, True), (True, False), (False, True)):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv
        with fastpath.strict_fp32():
            assert fastpath.tf32_flags() == (False, False)
            with fastpath.strict_fp32():  # nested: still off, and the outer one restores
                pass
            assert fastpath.tf32_flags() == (False, False)
        assert fastpath.tf32_flags() == (matmul, conv)
    with pytest.raises(RuntimeError), fastpath.strict_fp32():
        raise RuntimeError("an evaluation that fails")
    assert fastpath.tf32_flags() == (False, True)  # restored on the way out too


def test_evaluate_runs_with_tf32_off_and_restores_it():
    from raydistill.evaluation import evaluate

    seen = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            seen.append(fastpath.tf32_flags())
            return self.lin(x.flatten(1))

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    out = evaluate(Recording(), x, y, ["clean", "pgd10"], eps=0.1, batch_size=4)
    assert set(out) == {"clean_acc", "pgd10_acc"}
    assert seen and set(seen) == {(False, False)}
    assert fastpath.tf32_flags() == (True, True)


def test_a_tf32_run_trains_with_tf32_and_evaluates_without(tmp_path, monkeypatch):
    """--precision tf32 in-process on digits: the training steps see TF32 on (the CPU's arithmetic is
    fp32's), validation, diagnostics and the test attacks see it off; the figures are fp32's."""
    from raydistill import engine, evaluation
    from raydistill.engine import run_in_process

    seen = {"step": set(), "evaluate": set()}
    step, per_image = engine.Trainer.train_step, evaluation.per_image

    def recording_step(self, *a, **kw):
        seen["step"].add(fastpath.tf32_flags())
        return step(self, *a, **kw)

    def recording_evaluate(*a, **kw):
        seen["evaluate"].add(fastpath.tf32_flags())
        return per_image(*a, **kw)

    monkeypatch.setattr(engine.Trainer, "train_step", recording_step)
    monkeypatch.setattr(evaluation, "per_image", recording_evaluate)  # what validation and the test attacks call
    figures = {}
    for precision in ("tf32", "fp32"):
        cfg = config(tmp_path / precision, precision=precision, batch_size=256)
        figures[precision] = run_in_process(cfg).final_metrics
        if precision == "tf32":
            assert seen == {"step": {(True, True)}, "evaluate": {(False, False)}}, seen
            assert fastpath.tf32_flags() == (True, True)  # the run's policy stays after its evaluations
    keys = [k for k in figures["fp32"] if k.startswith(("test/", "val/", "train/loss"))]
    assert keys and all(figures["tf32"][k] == figures["fp32"][k] for k in keys)


# ============================================================================= CPU: no host sync in the step
SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def counting_host_syncs():
    """Count calls of the Tensor methods that make the host wait for the device."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def counted(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            calls.append(name)
            return fn(*a, **kw)
        return wrapper

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, counted(name, fn))
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_the_counter_sees_a_sync():
    with counting_host_syncs() as calls:
        t = torch.ones(2)
        t.sum().item(), float(t[0]), bool(t[0]), t.tolist()
    assert calls == ["item", "__float__", "__bool__", "tolist"]


@pytest.mark.parametrize("method,precision", [(m, p) for m in METHODS for p in ("fp32", "bf16")]
                         + [("natural", "fp32"), ("at_aka", "fp32"), ("cat_aka", "fp32")])
def test_no_host_sync_inside_a_production_training_step(tmp_path, method, precision):
    r = runner(tmp_path, method, precision=precision)
    batches = r.batches()
    r.step(*next(batches))  # the first step (lazy state: momentum buffers) counts too: below, steps 2 and 3
    with counting_host_syncs() as calls:
        for _ in range(2):
            x, y = next(batches)  # drawing an augmented batch from the device-resident data included
            losses = r.step(x, y)
    assert calls == [], calls
    assert all(v.dtype == torch.float32 for v in losses.values())


def test_an_epoch_waits_for_the_device_a_fixed_number_of_times_whatever_its_batch_count(tmp_path):
    """The epoch's loss sums and statistics are read once, at its end: as many waits with 7 batches as with 26."""
    from raydistill.engine import LocalSession, Trainer

    counts = []
    for batch_size in (256, 64):
        trainer = Trainer(config(tmp_path, "trades", batch_size=batch_size), LocalSession(str(tmp_path / str(batch_size))))
        trainer.setup()
        with counting_host_syncs() as calls:
            trainer.train_epoch(0)
        counts.append(len(calls))
    assert counts == [2, 2], counts  # the two loss terms' sums (ce, kl)


# ============================================================================= CPU: torch.compile
def graph_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["total"],
            "breaks": sum(counters["graph_break"].values())}


@pytest.mark.parametrize("method,compile", [("pgd_at", "attack"), ("trades", "attack"), ("peeraid", "attack"),
                                            ("trades", "all")])
def test_a_compiled_attack_breaks_no_graph_per_pgd_step_nor_recompiles_per_batch(tmp_path, monkeypatch, method, compile):
    """Dynamo's counters over 3 same-shape batches (the "eager" backend: graph capture, no code generation):
    no graph break; after the first step no new graph. Graphs the first step makes: one per grad mode
    (TRADES and PeerAiD take their target without a graph) and, with "all", the training forward too."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    r = runner(tmp_path, method, compile=compile, attack_steps=5)
    assert torch._dynamo.config.recompile_limit >= fastpath.RECOMPILE_LIMIT
    torch._dynamo.reset()
    counters.clear()
    batches = r.batches()
    seen = []
    for _ in range(3):
        r.step(*next(batches))
        seen.append(graph_counts())
    assert seen[0]["breaks"] == 0 and seen[0] == seen[1] == seen[2], seen
    assert 1 <= seen[0]["graphs"] <= (3 if compile == "all" else 2), seen  # not one per PGD step (5 here)


# ============================================================================= GPU
gpu = pytest.mark.gpu


@gpu
def test_fp32_on_cuda_is_strict_with_cudnn_benchmark(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # PyTorch's cudnn default
    torch.backends.cudnn.benchmark = False
    r = runner(tmp_path, precision="fp32")
    assert r.device.type == "cuda"
    assert fastpath.tf32_flags() == (False, False) and torch.backends.cudnn.benchmark is True
    runner(tmp_path / "tf32", precision="tf32")
    assert fastpath.tf32_flags() == (True, True) and torch.backends.cudnn.benchmark is True


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_on_cuda_with_loss_terms_in_fp32(tmp_path, method):
    r = runner(tmp_path, method, precision="bf16")
    x, y = next(r.batches())
    with fastpath.autocast(r.device, "bf16"):
        assert r.network("student")(x).dtype == torch.bfloat16  # the networks run in bf16
    losses = r.step(x, y)
    assert losses and all(v.dtype == torch.float32 and v.is_cuda and torch.isfinite(v) for v in losses.values())
    assert fastpath.tf32_flags() == (False, False)  # what stays fp32 is strict


@gpu
def test_data_and_networks_on_the_gpu_after_setup(tmp_path):
    r = runner(tmp_path, "peeraid")
    for split in ("train", "val", "test"):
        assert getattr(r.data, f"{split}_x").is_cuda and getattr(r.data, f"{split}_y").is_cuda, split
    x, y = next(r.batches())
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32
    assert all(p.is_cuda for n in r.specs for p in r.network(n).parameters())


@gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_sync_in_a_production_step_on_cuda(tmp_path, method, precision):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call (item, host copies,
    nonzero, ...) while two batches are drawn and stepped (after a warm-up step: cuDNN's benchmark)."""
    r = runner(tmp_path, method, precision=precision)
    batches = r.batches()
    r.step(*next(batches))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            x, y = next(batches)
            r.step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("compile", ["attack", "all"])
def test_compiled_attack_and_step_on_cuda(tmp_path, compile):
    """Inductor on CUDA: no graph break, no recompilation after the first step over 3 batches."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    r = runner(tmp_path, "trades", compile=compile, attack_steps=5)
    torch._dynamo.reset()
    counters.clear()
    batches, seen = r.batches(), []
    for _ in range(3):
        losses = r.step(*next(batches))
        seen.append(graph_counts())
    assert seen[0]["breaks"] == 0 and seen[0] == seen[1] == seen[2], seen
    assert all(torch.isfinite(v) for v in losses.values())


@gpu
def test_checkpoints_move_between_cuda_and_cpu(tmp_path):
    """A CUDA run's checkpoint (with its CUDA RNG state) resumes on the CPU, and a CPU run's on CUDA."""
    from raydistill.checkpoint import read_state
    from raydistill.engine import LocalSession, Trainer

    def session(run_dir, device):
        s = LocalSession(str(run_dir))
        s.device = torch.device(device)
        return s

    for first, then in (("cuda", "cpu"), ("cpu", "cuda")):
        run_dir = tmp_path / f"{first}_then_{then}"
        cfg = config(tmp_path, "pgd_at", batch_size=256, name=run_dir.name)
        one, two = dataclasses.replace(cfg, epochs=1), dataclasses.replace(cfg, epochs=2)
        Trainer(one, session(run_dir, first)).run()
        state = read_state(run_dir / "checkpoint_000001")
        assert (state["rng"]["cuda"] is not None) == (first == "cuda")
        if first == "cuda":  # resumed on CUDA, the CUDA generator continues where the checkpoint left it
            again = Trainer(two, session(shutil.copytree(run_dir, tmp_path / "again"), "cuda"))
            again.setup()
            assert torch.equal(torch.cuda.get_rng_state(), state["rng"]["cuda"])
        resumed = Trainer(two, session(run_dir, then))
        resumed.run()
        assert resumed.state.epoch == 2 and len(resumed.state.history) == 2
        assert all(p.device.type == then for m in resumed.modules.values() for p in m.parameters())
        assert 0.0 <= resumed.s.final_metrics["test/pgd20_acc"] <= 1.0


@gpu
def test_peak_memory_figure(tmp_path):
    r = runner(tmp_path, "peeraid")
    x, y = next(r.batches())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    r.step(x, y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    assert peak > x.numel() * x.element_size()  # at least the batch and the activations
