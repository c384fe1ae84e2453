"""Evaluation at scale: per-chunk results that do not depend on the process that attacks them, resumable
stored units, AutoAttack per component equal to pyautoattack's own run, the per-image worst case, and the
gradient-masking checks on a model built to mask gradients and on an honest PGD-AT model. The sharded
run on a real 2-node Ray cluster with S3 storage (2 workers equal to 1, killed and resumed):
tests/test_cluster_storage.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import assert_one_error_line, cli
from raydistill import attacks as A
from raydistill import sanity
from raydistill.errors import UsageError
from raydistill.evaluate import run_evaluation
from raydistill.evaluation import evaluate, per_image

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 0.1  # digits' training eps


@pytest.fixture(scope="module")
def pgd_at(tmp_path_factory):
    """A PGD-AT small_cnn on digits (5 quickstart epochs in this process, ~10 s): (checkpoint, model, data)."""
    from raydistill.checkpoint import load_model
    from raydistill.data import load_dataset

    root = tmp_path_factory.mktemp("pgdat")
    proc = cli("train", "pgd_at", "--preset", "quickstart", "--epochs", "5", "--workers", "0", "--tracking-uri", "none",
               "--storage-path", str(root), "--name", "pgdat", "--summary-json", str(root / "s.json"),
               env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = json.loads((root / "s.json").read_text())["checkpoint"]
    model, _ = load_model(ckpt)
    return ckpt, model, load_dataset("digits", val_size=0)


def saturated(ckpt: str, dest: Path) -> Path:
    """The same network with its last layer scaled by 1e4: a saturated softmax whose input gradients are exactly 0
    in fp32 on every confidently classified image (gradient masking, not robustness)."""
    from raydistill.checkpoint import atomic_save, safe_load

    rec = safe_load(ckpt)
    for key in ("head.2.weight", "head.2.bias"):
        rec["state_dict"][key] = rec["state_dict"][key] * 1e4
    atomic_save(rec, dest / "model.pt")
    return dest / "model.pt"


# ----------------------------------------------------------------------------- chunks
def test_chunk_results_do_not_depend_on_who_attacks_them(pgd_at):
    """Chunk c's randomness is seeded with seed + c alone: attacking the chunks in two shards (as two ranks or
    two Ray workers do) gives every image the same results as one pass, and evaluate() agrees with the counts."""
    _, model, data = pgd_at
    x, y = data.test_x[:100], data.test_y[:100]
    attacks = ["clean", "fgsm", "pgd20", "cw"]
    whole = per_image(model, x, y, attacks, eps=EPS, batch_size=16, seed=3)
    even = per_image(model, x, y, attacks, eps=EPS, batch_size=16, seed=3, chunks=[0, 2, 4, 6])
    odd = per_image(model, x, y, attacks, eps=EPS, batch_size=16, seed=3, chunks=[5, 3, 1])
    for a in attacks:
        joined = torch.empty(100, dtype=torch.bool)
        joined[torch.cat([torch.arange(c * 16, min(c * 16 + 16, 100)) for c in [0, 2, 4, 6]])] = even[a]["correct"]
        joined[torch.cat([torch.arange(c * 16, min(c * 16 + 16, 100)) for c in [5, 3, 1]])] = odd[a]["correct"]
        assert torch.equal(joined, whole[a]["correct"]), a
    accs = evaluate(model, x, y, attacks, eps=EPS, batch_size=16, seed=3)
    assert accs == {f"{a}_acc": int(whole[a]["correct"].sum()) / 100 for a in attacks}
    assert accs["clean_acc"] > accs["pgd20_acc"] > 0.3  # a robust model: PGD-20 leaves most of it


# ----------------------------------------------------------------------------- stored, resumable
def test_interrupted_evaluation_resumes_without_attacking_a_batch_twice(pgd_at, tmp_path):
    ckpt, model, data = pgd_at
    kw = dict(eps=EPS, step_size=EPS / 4, n_examples=80, batch_size=16, dataset="digits", quiet=True,
              storage_path=str(tmp_path))
    attacks = ["clean", "fgsm", "pgd20"]
    seen: list[tuple[str, int]] = []

    def stop_after_four(attack, chunk):
        seen.append((attack, chunk))
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_evaluation(ckpt, model, data, attacks, name="cut", on_unit=stop_after_four, **kw)
    again: list[tuple[str, int]] = []
    s = run_evaluation(ckpt, model, data, attacks, name="cut", on_unit=lambda a, c: again.append((a, c)), **kw)
    assert len(again) == 15 - 4 and not set(again) & set(seen)  # 3 attacks x 5 batches, each attacked once
    whole = run_evaluation(ckpt, model, data, attacks, name="whole", **kw)
    cut, ref = pq.read_table(s["per_image"]), pq.read_table(whole["per_image"])
    assert cut.equals(ref) and s["metrics"] == whole["metrics"] and s["worst_acc"] == whole["worst_acc"]
    units = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "evaluations" / "cut" / "units").glob("*/*.parquet"))])
    assert sorted(units.column("index").to_pylist()) == sorted(list(range(80)) * 3)  # every image once per attack
    assert len(set(units.column("launch").to_pylist())) == 2
    # the worst case is per image: correct under every attack, not the smallest accuracy
    col = {k: np.array(cut.column(k).to_pylist()) for k in ("clean", "fgsm", "pgd20", "worst")}
    assert (col["worst"] == (col["clean"] & col["fgsm"] & col["pgd20"])).all()
    assert s["worst_acc"] == pytest.approx(col["worst"].mean()) and s["worst_acc"] <= min(s["metrics"].values())
    # a finished evaluation relaunched attacks nothing; other settings under its name are refused
    none: list = []
    run_evaluation(ckpt, model, data, attacks, name="cut", on_unit=lambda a, c: none.append(a), **kw)
    assert none == []
    with pytest.raises(UsageError, match="holds another evaluation.*eps"):
        run_evaluation(ckpt, model, data, attacks, name="cut", **{**kw, "eps": 0.05})


def test_cli_logs_worst_case_and_per_image_artifact_to_mlflow(pgd_at, tmp_path):
    from mlflow.tracking import MlflowClient

    ckpt, _, _ = pgd_at
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = cli("evaluate", ckpt, "--attacks", "clean,pgd20", "--n-examples", "40", "--batch-size", "16", "-q",
               "--storage-path", str(tmp_path / "st"), "--tracking-uri", uri, "--summary-json", str(tmp_path / "e.json"),
               env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((tmp_path / "e.json").read_text())
    assert list(s["metrics"]) == ["clean_acc", "pgd20_acc"] and s["worst_over"] == ["clean", "pgd20"]
    assert "worst case" in proc.stdout and s["per_image"].startswith(str(tmp_path / "st" / "evaluations"))
    run_id = proc.stdout.strip().split()[-1]
    client = MlflowClient(uri)
    assert client.get_run(run_id).data.metrics["test/worst_acc"] == pytest.approx(s["worst_acc"])
    assert sorted(a.path for a in client.list_artifacts(run_id, "evaluation")) == [
        "evaluation/evaluation.json", "evaluation/per_image.parquet"]


def test_bad_evaluation_options_are_one_error_line(pgd_at, tmp_path):
    ckpt, _, _ = pgd_at
    for args, needle in [(["--workers", "-1"], "--workers"), (["--gpus-per-worker", "1"], "need --workers"), (["--cpus-per-worker", "1"], "need --workers"),
                         (["--workers", "2", "--device", "cpu"], "--device"), (["--attacks", "zero_grad"], "zero_grad")]:
        assert_one_error_line(cli("evaluate", ckpt, "--storage-path", str(tmp_path), *args), needle)
    assert not (tmp_path / "evaluations").exists()


# ----------------------------------------------------------------------------- the masking checks
def _table(**cols) -> pa.Table:
    n = len(next(iter(cols.values())))
    return pa.table({"index": np.arange(n), **cols})


def test_masking_checks_and_their_thresholds():
    n = 100
    ok = np.ones(n, bool)
    base = dict(pgd10=ok.copy(), pgd50=ok.copy(), pgd100=ok.copy(), pgd100_eps1=np.zeros(n, bool),
                aa_stage=np.array([""] * n, dtype=object), zero_grad=np.zeros(n, bool), pgd20=ok.copy())
    flags = lambda **over: [f.check for f in sanity.check(_table(**{**base, **over}), ["pgd20"])[0] if f.failed]  # noqa: E731
    assert flags() == []
    assert flags(pgd100_eps1=np.arange(n) < 1) == []  # 1 % is the limit
    assert flags(pgd100_eps1=np.arange(n) < 2) == ["unbounded_pgd"]
    # PGD-50 leaves b images correct that PGD-10 fooled, and fools c that PGD-10 left: flagged when b - c > max(1, 2 sqrt(b + c))
    p10 = np.arange(n) >= 10  # PGD-10 fools images 0-9
    assert flags(pgd10=p10, pgd50=np.arange(n) >= 8, pgd100=np.arange(n) >= 8) == []  # b 2, c 0: 2 <= 2.83
    assert flags(pgd10=p10, pgd50=np.arange(n) >= 2, pgd100=np.arange(n) >= 2) == ["more_steps_help"]  # 8 > 5.66
    stage = base["aa_stage"].copy()
    stage[5] = "square"
    assert flags(aa_stage=stage) == ["black_box_beats_white_box"]
    assert flags(aa_stage=stage, pgd20=np.arange(n) != 5) == []  # a white-box attack fooled it too
    assert flags(zero_grad=np.arange(n) == 7) == ["zero_gradients"]


@pytest.mark.slow
def test_autoattack_components_equal_pyautoattack_run_directly(pgd_at):
    """Our AutoAttack, one component at a time on what the earlier ones left, equals pyautoattack's own standard
    run (its AutoAttack class called directly, one batch) image by image, and its per-component accuracies are
    the ones AutoAttack logs."""
    from pyautoattack import AutoAttack

    _, model, data = pgd_at
    x, y = data.test_x[:24].float(), data.test_y[:24]
    x_adv, stage = A.autoattack_stages(model, x, y, eps=EPS, seed=7)
    direct = AutoAttack(A._FloatLogits(model), norm="Linf", eps=EPS, version="standard", seed=7, device="cpu")
    direct.apgd_targeted.n_target_classes = direct.fab.n_target_classes = 9
    ref, _ = direct.run_standard_evaluation(x, y, batch_size=24)
    assert torch.equal(x_adv, ref)
    with torch.no_grad():
        assert torch.equal(stage < 0, model(ref).argmax(1) == y)
    print("aa stages:", stage.tolist())
    assert (stage == 1).any() and (stage < 0).any()  # APGD-CE fooled some, some survived everything


@pytest.mark.slow
def test_sanity_flags_a_saturated_model_and_passes_pgd_at(pgd_at, tmp_path):
    ckpt, _, _ = pgd_at
    common = ["--attacks", "clean,pgd20", "--n-examples", "32", "--batch-size", "16", "--sanity",
              "--storage-path", str(tmp_path / "st")]
    honest = cli("evaluate", ckpt, *common, "--summary-json", str(tmp_path / "h.json"), env={"OMP_NUM_THREADS": "1"})
    assert honest.returncode == 0, honest.stderr[-2000:]
    h = json.loads((tmp_path / "h.json").read_text())
    assert h["masking_flags"] == [] and "passed" in honest.stdout and "warning:" not in honest.stderr
    assert h["sanity"]["unbounded_pgd_acc"] <= 0.01 and h["sanity"]["zero_grad_images"] == 0
    assert h["metrics"]["pgd20_acc"] - h["worst_acc"] <= 0.1  # AutoAttack adds little to PGD on an honest model

    masked = cli("evaluate", str(saturated(ckpt, tmp_path)), *common, "--summary-json", str(tmp_path / "m.json"),
                 env={"OMP_NUM_THREADS": "1"})
    m = json.loads((tmp_path / "m.json").read_text())
    warnings = [ln for ln in masked.stderr.splitlines() if ln.startswith("warning:")]
    print("saturated:", m["metrics"], m["worst_acc"], m["sanity"], warnings)
    assert masked.returncode == 1 and {"unbounded_pgd", "zero_gradients"} <= set(m["masking_flags"])
    assert len(warnings) == len(m["masking_flags"]) and "FAILED" in masked.stdout
    # what the flags protect against: PGD-20 (moved only by its random start) sees the saturated model about as
    # accurate as clean, far above what AutoAttack's scale-free DLR loss finds
    assert m["metrics"]["pgd20_acc"] >= m["metrics"]["clean_acc"] - 0.07 and m["metrics"]["pgd20_acc"] > m["worst_acc"] + 0.2


@pytest.mark.slow
def test_sanity_flags_a_step_function_model_where_square_beats_white_box(pgd_at, tmp_path):
    """Inputs rounded to 1/8 before the network: zero gradients everywhere, so only Square (black-box) attacks."""
    ckpt, model, data = pgd_at

    class Rounded(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(torch.round(x * 8) / 8)

    s = run_evaluation(ckpt, Rounded(model), data, ["clean", "pgd20"], eps=EPS, step_size=EPS / 4, n_examples=32,
                       batch_size=16, sanity=True, storage_path=str(tmp_path), dataset="digits", quiet=True)
    print("step function:", s["metrics"], s["aa_fooled"], s["sanity"])
    assert {"zero_gradients", "black_box_beats_white_box"} <= set(s["masking_flags"])
    assert s["aa_fooled"]["square"] > 0 and s["aa_fooled"]["apgd-ce"] == 0
