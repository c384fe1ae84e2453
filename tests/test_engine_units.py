"""Fast checks of the engine's pieces: schedules, config resolution, losses, learning rates, checkpoints."""
from __future__ import annotations

import argparse
import dataclasses
import pickle

import pytest
import torch

from raydistill import checkpoint, losses
from raydistill.config import PRESETS, TrainConfig, add_run_options, build_config
from raydistill.engine import lr_at
from raydistill.errors import UsageError
from raydistill.schedules import Schedule, parse_schedule, value_at


def args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_run_options(p)
    return p.parse_args(list(argv))


# ----------------------------------------------------------------------------- schedules
def test_schedules_parse_and_evaluate():
    assert parse_schedule("0.5") == 0.5
    lin = parse_schedule("linear(0, 1, 2, 6)")
    assert [lin(e) for e in (0, 2, 4, 6, 9)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    st = parse_schedule("step(1,0.1,40)")
    assert (st(39.99), st(40)) == (1.0, 0.1)
    assert parse_schedule({"kind": "linear", "start": 0, "end": 2, "from": 0, "to": 4})(1) == 0.5
    assert parse_schedule(st.to_dict()) == st and parse_schedule(str(lin)) == lin
    assert value_at(3.0, 10) == 3.0


@pytest.mark.parametrize("bad", ["abc", "linear(0,1,5,2)", "linear(0,1)", "__import__('os')", "nan", True,
                                 {"kind": "cosine"}])
def test_bad_schedules_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_schedule(bad, "beta")


# ----------------------------------------------------------------------------- config path
def test_config_precedence_defaults_preset_flags_set():
    cfg = build_config("trades", args("--dataset", "digits", "--set", "beta=2", "--epochs", "3"))
    assert cfg.hp["beta"] == 2.0 and cfg.epochs == 3 and cfg.student == "small_cnn"
    assert cfg.eps == pytest.approx(0.1) and cfg.hp["kl_reduction"] == "batchmean"
    q = build_config("pgd_at", args("--preset", "quickstart"))
    assert q.dataset == "digits" and q.epochs == PRESETS["quickstart"]["epochs"]
    assert build_config("pgd_at", args("--preset", "quickstart", "--epochs", "2")).epochs == 2
    sched = build_config("trades", args("--set", "beta=linear(0,6,0,5)")).hp["beta"]
    assert isinstance(sched, Schedule) and sched(5) == 6
    assert build_config("natural", args("--workers", "0")).placement.in_process


def test_a_trial_is_the_top_layer_and_ranges_hold_in_every_layer():
    from raydistill.config import resolve

    cfg = resolve("trades", {"epochs": 10, "lr": 0.2}, {"beta": "2"}, trial={"beta": 3.0, "lr": 0.01})
    assert cfg.hp["beta"] == 3.0 and cfg.lr == 0.01 and cfg.epochs == 10  # the trial wins over flags and --set
    ramp = resolve("trades", {"epochs": 10}, trial={"beta": {"kind": "linear", "start": 0.0, "end": 6.0,
                                                             "from_frac": 0.0, "to_frac": 0.5}}).hp["beta"]
    assert ramp(5) == 6.0  # fractions of the run's epochs become epochs
    with pytest.raises(UsageError, match="tau of peeraid must be > 0"):
        resolve("peeraid", trial={"tau": -1.0})
    with pytest.raises(UsageError, match="lr"):
        resolve("trades", trial={"lr": -0.1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # frozen: a launcher fills placement with dataclasses.replace
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.placement.name = "x"


def test_config_round_trips_through_dict():
    cfg = build_config("trades", args("--set", "beta=step(1,6,2)"))
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again.hp == cfg.hp and again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("argv,needle", [
    (["--set", "gamma=1"], "has no hyperparameter 'gamma'"),
    (["--set", "beta=abc"], "beta='abc'"),
    (["--set", "kl_reduction=sum"], "must be one of batchmean, mean"),
    (["--set", "novalue"], "NAME=VALUE"),
    (["--dataset", "svhn"], "unknown dataset 'svhn'"),
    (["--student", "resnet9"], "unknown model 'resnet9'"),
    (["--preset", "fast"], "unknown preset 'fast'"),
    (["--eps", "2"], "pixel scale"),
    (["--teacher", "/nonexistent/ckpt"], "does not exist"),
    (["--lr-milestones", "a,b"], "--lr-milestones"),
    (["--set", "beta=-1"], "beta of trades must be >= 0"),  # the declared range, not only the type
    (["--set", "beta=step(-2,6,3)"], "must be >= 0 at every epoch"),
])
def test_config_errors_name_the_bad_value(argv, needle):
    with pytest.raises(UsageError, match=None) as exc:
        build_config("trades", args(*argv))
    assert needle in str(exc.value)


def test_lr_piecewise_decay():
    cfg = TrainConfig(lr=0.1, lr_milestones=[2, 4])
    assert [round(lr_at(cfg, e), 6) for e in range(6)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


# ----------------------------------------------------------------------------- losses
def test_kl_matches_hand_computation_and_reductions():
    p = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    tau = 2.0
    ps, qs = torch.softmax(p / tau, 1), torch.softmax(q / tau, 1)
    per = (ps * (ps.log() - qs.log())).sum(1)
    assert losses.kl(p, q, tau, "batchmean").item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert losses.kl(p, q, tau, "mean").item() == pytest.approx(per.mean().item() / 3, rel=1e-6)
    w = torch.tensor([0.25, 1.0])
    assert losses.kl(p, q, tau, "batchmean", w).item() == pytest.approx((per * w).mean().item(), rel=1e-6)
    assert losses.kl_to_probs(ps, q, tau).item() == pytest.approx(per.mean().item(), rel=1e-6)
    y = torch.tensor([0, 2])
    ce = -(torch.log_softmax(q, 1)[[0, 1], y]).mean()
    assert losses.ce(q, y).item() == pytest.approx(ce.item(), rel=1e-6)


# ----------------------------------------------------------------------------- checkpoints
def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    checkpoint.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, fh):
        fh.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert checkpoint.safe_load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left


def test_process_killed_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    """SIGKILL in the middle of torch.save (no Python cleanup can run): the file keeps its old content."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "state.pt"
    checkpoint.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    code = textwrap.dedent(f"""
        import os, signal, torch
        from raydistill import checkpoint

        def dying_save(obj, fh):
            fh.write(b"partial bytes")
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = dying_save
        checkpoint.atomic_save({{"epoch": 2}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert checkpoint.safe_load(path)["epoch"] == 1
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the write did start


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_malicious_pickle_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as fh:
        torch.save({"state_dict": _Evil()}, fh, pickle_module=pickle)
    with pytest.raises(UsageError, match="refused by the safe loader"):
        checkpoint.safe_load(bad)
    assert not (tmp_path / "PWNED").exists()


def _fresh_run(tmp_path):
    from raydistill import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "epochlogger")
    return uri, c, c.create_run(exp).info.run_id


def _steps(c, run_id, key):
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def test_an_epoch_logged_before_a_crash_is_not_logged_again_on_restart(tmp_path):
    """Worker killed after logging epoch 0 but before Ray registered its checkpoint: the restarted
    worker redoes epoch 0 from scratch (empty history) and must not log it a second time."""
    from raydistill.tracking import EpochLogger

    uri, c, run_id = _fresh_run(tmp_path)
    m0 = {"epoch": 1, "val/pgd10_acc": 0.25, "train/loss": 2.0}
    first = EpochLogger(uri, run_id)
    first.backfill([])
    first.log_epoch(0, m0)
    # restart without the epoch-0 checkpoint: the same epoch is trained and logged again
    second = EpochLogger(uri, run_id)
    second.backfill([])
    second.log_epoch(0, m0)
    second.log_epoch(1, dict(m0, epoch=2))
    # restart with a checkpoint whose history MLflow lacks in part: only the missing epoch is added
    third = EpochLogger(uri, run_id)
    third.backfill([m0, dict(m0, epoch=2), dict(m0, epoch=3)])
    assert _steps(c, run_id, "val/pgd10_acc") == [0, 1, 2]
    assert _steps(c, run_id, "train/loss") == [0, 1, 2]


def test_a_log_request_that_failed_after_the_server_stored_it_is_not_repeated(tmp_path, monkeypatch):
    from raydistill.tracking import EpochLogger

    uri, c, run_id = _fresh_run(tmp_path)
    logger = EpochLogger(uri, run_id)
    real, calls = logger.c.log_batch, []

    def stored_then_timed_out(*a, **kw):
        calls.append(1)
        real(*a, **kw)
        raise TimeoutError("read timed out")

    monkeypatch.setattr(logger.c, "log_batch", stored_then_timed_out)
    monkeypatch.setattr("time.sleep", lambda s: None)
    logger.log_epoch(0, {"epoch": 1, "val/pgd10_acc": 0.5})
    final = {"epochs_completed": 1, "best_epoch": 0, "test/clean_acc": 0.9, "test/pgd20_acc": 0.4}
    logger.log_final(final)
    logger.log_final(final)  # relaunched after the run ended: same figures, not logged again
    assert len(calls) == 2
    assert _steps(c, run_id, "val/pgd10_acc") == [0]
    assert _steps(c, run_id, "test/clean_acc") == [1]


def test_resume_takes_the_newest_stored_checkpoint_that_ray_never_registered(tmp_path, monkeypatch):
    """A worker that dies between rank 0's upload of an epoch's checkpoint and the controller's next
    poll leaves that checkpoint persisted but unregistered: the restarted group resumes from it, not
    from Ray's older one; a half-uploaded folder (does not load) is passed over."""
    import shutil
    import types

    import pyarrow.fs
    import ray.train

    from raydistill.sessions import RaySession, checkpoint_name

    for epochs, content in ((1, {"epoch": 1}), (2, {"epoch": 2}), (3, None)):
        folder = tmp_path / checkpoint_name(epochs)
        folder.mkdir()
        if content is None:
            (folder / checkpoint.STATE_FILE).write_bytes(b"PK\x03\x04 truncated upload")
        else:
            checkpoint.atomic_save(content, folder / checkpoint.STATE_FILE)
    (tmp_path / "checkpoint_2026-11-30_10-00-00.000000").mkdir()  # Ray's default naming: not ours
    storage = types.SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), experiment_fs_path=str(tmp_path))
    monkeypatch.setattr(ray.train, "get_context", lambda: types.SimpleNamespace(get_storage=lambda: storage))
    session = object.__new__(RaySession)
    session.rank = 0

    registered = ray.train.Checkpoint(str(tmp_path / checkpoint_name(1)))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: registered)
    assert RaySession._stored_checkpoints(storage) == [(n, str(tmp_path / checkpoint_name(n))) for n in (1, 2, 3)]
    assert session.load_checkpoint() == {"epoch": 2}  # 3 is half-written, 2 is newer than Ray's 1
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert session.load_checkpoint() == {"epoch": 2}  # Ray registered none yet
    registered = ray.train.Checkpoint(str(tmp_path / checkpoint_name(2)))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: registered)
    assert session.load_checkpoint() == {"epoch": 2}
    for n in (1, 2, 3):
        shutil.rmtree(tmp_path / checkpoint_name(n))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert session.load_checkpoint() is None  # a fresh run


# ----------------------------------------------------------------------------- the training state
def _small_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))


def _state(seed: int, swa: bool = True) -> checkpoint.TrainingState:
    nets = {"student": _small_net(seed), "peer": _small_net(seed + 1)}
    opts = {n: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for n, m in nets.items()}
    avg = torch.optim.swa_utils.AveragedModel(nets["student"]) if swa else None
    return checkpoint.TrainingState(nets, opts, avg, student="student")


def _train_a_little(state: checkpoint.TrainingState) -> None:
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    for _ in range(2):
        for n, m in state.nets.items():
            state.optimizers[n].zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            state.optimizers[n].step()
    state.swa.update_parameters(state.nets["student"])


def _old_layout(state: checkpoint.TrainingState, epoch_done: int, best: dict, history: list) -> dict:
    """state.pt as Trainer.write_checkpoint wrote it before TrainingState (engine.py of commit cc7b42a)."""
    import random

    def _cpu(sd):
        return {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in sd.items()}

    def _listify(obj):
        return [_listify(o) for o in obj] if isinstance(obj, (tuple, list)) else obj

    return {
        "epoch": epoch_done,
        "nets": {n: _cpu(state.nets[n].state_dict()) for n in state.nets},
        "optimizers": {n: state.optimizers[n].state_dict() for n in state.nets},
        "swa": _cpu(state.swa.state_dict()) if state.swa is not None else None,
        "best": best,
        "history": history,
        "rng": {"torch": torch.get_rng_state(), "python": list(_listify(random.getstate())), "cuda": None},
        "config": TrainConfig().to_dict(),
    }


def _assert_same_training_state(a: checkpoint.TrainingState, b: checkpoint.TrainingState) -> None:
    for n in a.nets:
        for (ka, va), (kb, vb) in zip(a.nets[n].state_dict().items(), b.nets[n].state_dict().items()):
            assert ka == kb and torch.equal(va, vb), (n, ka)
        sa, sb = a.optimizers[n].state_dict(), b.optimizers[n].state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        for i in sa["state"]:
            assert torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"]), (n, i)
    for (ka, va), (kb, vb) in zip(a.swa.state_dict().items(), b.swa.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert (a.epoch, a.history, a.best["pgd10"], a.best["epoch"]) == (b.epoch, b.history, b.best["pgd10"], b.best["epoch"])


def test_a_checkpoint_in_the_old_layout_resumes(tmp_path):
    """A state.pt written by the code before TrainingState (the same keys) restores every network,
    optimizer, the averaged weights, epoch, best, history and the RNG states."""
    import random

    written = _state(0)
    _train_a_little(written)
    written.epoch, written.history = 3, [{"epoch": e + 1, "val/pgd10_acc": 0.1 * e} for e in range(3)]
    written.consider_best({"clean": 0.6, "pgd10": 0.2}, 2, "student", written.nets["student"], False)
    random.seed(11)
    torch.manual_seed(12)
    checkpoint.atomic_save(_old_layout(written, 3, written.best, written.history), tmp_path / checkpoint.STATE_FILE)
    want = (torch.rand(3), random.random())  # what the writer's RNGs draw next

    resumed = _state(5)  # other initial weights, no optimizer state yet
    random.seed(0)
    torch.manual_seed(0)
    resumed.load_state_dict(checkpoint.read_state(tmp_path))
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and got[1] == want[1]
    _assert_same_training_state(written, resumed)
    assert torch.equal(resumed.best["state_dict"]["0.weight"], written.nets["student"].state_dict()["0.weight"])
    assert resumed.best["student"] == "student" and resumed.best["averaged"] is False


def test_training_state_writes_the_old_layout_and_round_trips(tmp_path):
    written = _state(0)
    _train_a_little(written)
    written.epoch, written.history = 2, [{"epoch": 1}, {"epoch": 2}]
    written.consider_best({"clean": 0.7, "pgd10": 0.3}, 1, "student", written.swa.module, True)
    written.consider_best({"clean": 0.9, "pgd10": 0.1}, 1, "student", written.nets["student"], False)  # not better: kept
    assert written.best["averaged"] is True and written.best["pgd10"] == 0.3 and written.best["score"] == 0.3
    meta = {"method": "pgd_at", "student": "student"}
    written.save(tmp_path, config={"seed": 0}, student="student", arch="small_cnn", num_classes=3,
                 in_shape=(1, 8, 8), meta=meta)
    state = checkpoint.read_state(tmp_path)
    assert list(state) == list(_old_layout(written, 2, written.best, written.history))  # same keys, same order
    assert state["config"] == {"seed": 0} and state["epoch"] == 2 and state["rng"]["cuda"] is None
    assert isinstance(state["rng"]["python"], list)
    model, last = (checkpoint.safe_load(tmp_path / f) for f in (checkpoint.MODEL_FILE, checkpoint.LAST_MODEL_FILE))
    assert model["meta"] == dict(meta, epoch=1, val_pgd10_acc=0.3, val_clean_acc=0.7, selected_by="val/pgd10_acc")
    assert last["meta"] == dict(meta, epoch=1)
    swa_weights = written.swa.module.state_dict()["0.weight"]
    assert torch.equal(model["state_dict"]["0.weight"], swa_weights)  # the best: the averaged weights
    assert torch.equal(last["state_dict"]["0.weight"], written.nets["student"].state_dict()["0.weight"])
    resumed = _state(7)
    resumed.load_state_dict(state)
    _assert_same_training_state(written, resumed)


def test_a_state_written_on_cuda_resumes_on_the_cpu(tmp_path):
    """read_state maps every tensor to the CPU; load_state_dict copies each to where its network lives,
    and restores a cuda RNG state on a cuda device only."""
    written = _state(0)
    _train_a_little(written)
    state = written.state_dict()
    state["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # as a cuda run writes it (a CPU byte tensor)
    checkpoint.atomic_save(state, tmp_path / checkpoint.STATE_FILE)
    resumed = _state(3)
    resumed.load_state_dict(checkpoint.read_state(tmp_path))
    _assert_same_training_state(written, resumed)
    if torch.cuda.is_available():  # and the other way: loaded onto a cuda device
        cuda = _state(3)
        for m in [*cuda.nets.values(), cuda.swa]:
            m.cuda()
        cuda.device = torch.device("cuda")
        cuda.load_state_dict(checkpoint.read_state(tmp_path))
        assert all(p.is_cuda for m in cuda.nets.values() for p in m.parameters())
        assert all(s["momentum_buffer"].is_cuda for o in cuda.optimizers.values() for s in o.state.values())


# ----------------------------------------------------------------------------- refresh_bn
def _old_refresh_bn(model, batches) -> None:
    """Trainer.refresh_bn before it used torch.optim.swa_utils.update_bn (engine.py of commit cc7b42a)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = {}
    for bn in bns:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None
    was = model.training
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for bn in bns:
        bn.momentum = momenta[bn]
    model.train(was)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_refresh_bn_gives_the_running_statistics_of_the_old_code(rank, world_size):
    import copy
    import types

    from raydistill.data import iterate_batches, load_dataset
    from raydistill.engine import Trainer

    d = load_dataset("digits", val_size=0)
    trainer = object.__new__(Trainer)
    trainer.data, trainer.cfg, trainer.per_worker_batch, trainer.device = d, TrainConfig(seed=4), 64, torch.device("cpu")
    trainer.s = types.SimpleNamespace(rank=rank, world_size=world_size)
    model = _small_net(0).eval()
    model[1].momentum = 0.3
    new, old = copy.deepcopy(model), copy.deepcopy(model)
    trainer.refresh_bn(new, 2)
    _old_refresh_bn(old, iterate_batches(d.train_x, d.train_y, 64, shuffle=True, seed=4 + 7919, epoch=2, rank=rank,
                                         world_size=world_size, augment=True, crop_pad=d.crop_pad, hflip=d.hflip))
    for (k, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items()):
        assert torch.equal(a, b), k
    assert int(new[1].num_batches_tracked) == -(-len(d.train_y[rank::world_size]) // 64)
    assert new[1].momentum == 0.3 and not new.training
    assert not torch.equal(new[1].running_mean, model[1].running_mean)  # the statistics did change


# ----------------------------------------------------------------------------- hooks
def test_hooks_are_called_in_order_at_their_points_and_a_non_hook_is_refused():
    from raydistill.engine import Hooks

    calls = []

    class A:
        def on_batch(self, trainer, epoch, index, n_batches):
            calls.append(("A", epoch, index, n_batches))

        def on_end(self, trainer):
            calls.append(("A", "end"))

    class B:
        def on_batch(self, trainer, epoch, index, n_batches):
            calls.append(("B", epoch, index, n_batches))

    hooks = Hooks([A(), B()])
    hooks("on_batch", None, 1, 2, 3)
    hooks("after_report", None, 1)
    hooks("on_end", None)
    assert calls == [("A", 1, 2, 3), ("B", 1, 2, 3), ("A", "end")]
    with pytest.raises(TypeError, match="not a hook"):
        Hooks([object()])


def test_the_best_checkpoint_follows_the_selection():
    """PGD-10 keeps the most robust epoch, "clean" (natural training) the most accurate; both keep the
    kept epoch's two accuracies."""
    history = [{"clean": 0.90, "pgd10": 0.30}, {"clean": 0.95, "pgd10": 0.20}, {"clean": 0.93, "pgd10": 0.25}]
    for selection, epoch in (("pgd10", 0), ("clean", 1)):
        state = _state(0, swa=False)
        state.selection = selection
        for e, accs in enumerate(history):
            state.consider_best(accs, e, "student", state.nets["student"], False)
        assert state.best["epoch"] == epoch and state.best["by"] == selection
        assert state.best["score"] == history[epoch][selection]
        assert (state.best["clean"], state.best["pgd10"]) == (history[epoch]["clean"], history[epoch]["pgd10"])


def test_a_best_written_before_the_selection_is_rescored_from_the_history():
    """A checkpoint's best without a score was picked by PGD-10: kept as such by a PGD-10 run; a natural run
    scores it by its epoch's validation clean accuracy (so only a better epoch replaces it)."""
    history = [{"epoch": 1, "val/clean_acc": 0.8, "val/pgd10_acc": 0.3}, {"epoch": 2, "val/clean_acc": 0.9, "val/pgd10_acc": 0.1}]
    old = {"pgd10": 0.3, "epoch": 0, "student": "student", "state_dict": None, "averaged": False}
    pgd = checkpoint.rescored(old, history, "pgd10")
    assert (pgd["score"], pgd["by"], pgd["clean"]) == (0.3, "pgd10", 0.8)
    clean = checkpoint.rescored(old, history, "clean")
    assert (clean["score"], clean["by"], clean["pgd10"]) == (0.8, "clean", 0.3)


def test_a_natural_run_keeps_its_best_clean_epoch(tmp_path):
    """``train natural --preset quickstart`` in-process (5 epochs, one thread): the checkpoint kept, the summary,
    the progress and the MLflow run all follow natural training's selection, validation clean accuracy (by
    PGD-10, as every other method, a digits run kept epoch 3 of 10: clean 0.960 against 0.980 at the end)."""
    import json

    from raydistill.tracking import client
    from raydistill.train import main

    threads = torch.get_num_threads()
    try:
        argv = ["natural", "--dataset", "digits", "--preset", "quickstart", "--workers", "0", "--epochs", "5",
                "--cpus-per-worker", "1", "--test-attacks", "clean", "--storage-path", str(tmp_path / "runs"),
                "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--name", "nat",
                "--summary-json", str(tmp_path / "nat.json")]
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    s = json.loads((tmp_path / "nat.json").read_text())
    hist = checkpoint.read_state(s["checkpoint"])["history"]
    clean = [h["val/clean_acc"] for h in hist]
    best = clean.index(max(clean))  # the first epoch with the best clean accuracy
    pgd_pick = [h["val/pgd10_acc"] for h in hist]
    print(f"clean by epoch {clean}, kept epoch {best + 1}; PGD-10 would keep epoch {pgd_pick.index(max(pgd_pick)) + 1}")
    assert s["selected_by"] == "val/clean_acc" and s["best_epoch"] == best + 1
    assert s["val_best_acc"] == s["val_best_clean_acc"] == max(clean)
    assert s["val_best_pgd10_acc"] == hist[best]["val/pgd10_acc"]  # the kept epoch's, not the best PGD-10
    assert [h["val/best_acc"] for h in hist] == [max(clean[:e + 1]) for e in range(len(clean))]
    model = checkpoint.safe_load(f"{s['checkpoint']}/{checkpoint.MODEL_FILE}")
    assert (model["meta"]["epoch"], model["meta"]["selected_by"]) == (best, "val/clean_acc")
    # the kept weights are that epoch's: their validation clean accuracy is the one logged then
    from raydistill.data import load_dataset
    from raydistill.evaluation import evaluate

    net, _ = checkpoint.load_model(s["checkpoint"], "cpu")
    d = load_dataset("digits", val_size=200)
    assert evaluate(net, d.val_x, d.val_y, ["clean"], eps=0.0, step_size=0.0)["clean_acc"] == pytest.approx(max(clean))
    run = client(s["tracking_uri"]).get_run(s["mlflow_run_id"]).data
    assert run.tags["selected_by"] == "val/clean_acc" and run.tags["best_epoch"] == str(best + 1)
    assert run.metrics["val/best_acc"] == max(clean)


def test_tune_ranks_trials_by_their_kept_checkpoints_selection():
    """A search's best trial has the best val/best_acc (a natural search: clean accuracy, not its PGD-10);
    trials recorded before that metric existed rank by val/best_pgd10_acc. Natural searches default to the
    clean objective and ASHA on val/clean_acc."""
    from types import SimpleNamespace

    from raydistill import tune
    from raydistill.methods import selected_by

    cfg = SimpleNamespace(method="natural", dataset="digits", placement=SimpleNamespace(tracking_uri=None))
    args = SimpleNamespace(search="tpe", scheduler="asha")

    def trial(tid, **m):
        return {"trial_id": tid, "status": "COMPLETED", "epochs_completed": 2, "metrics": m}

    new = [trial("a", val_best_acc=0.99, val_best_pgd10_acc=0.1), trial("b", val_best_acc=0.9, val_best_pgd10_acc=0.3)]
    assert tune.tune_summary(cfg, "s", "p", new, ["val/clean_acc"], 1.0, args)["best"]["trial_id"] == "a"
    old = [trial("a", val_best_pgd10_acc=0.2), trial("b", val_best_pgd10_acc=0.3)]
    assert tune.tune_summary(cfg, "s", "p", old, ["val/pgd10_acc"], 1.0, args)["best"]["trial_id"] == "b"
    assert tune.DEFAULT_OBJECTIVES[selected_by("natural")] == "clean"
    assert tune.DEFAULT_OBJECTIVES[selected_by("pgd_at")] == "robust"
