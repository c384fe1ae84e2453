"""Evaluation at scale: every (attack, chunk) unit attacked once, on Ray workers or in this process, and
its per-image results stored as it finishes, so that a relaunch continues where a killed one stopped.

The evaluation's folder (``<storage>/evaluations/<name>``, local or s3:// / gs://) holds

* ``evaluation.json``: what is evaluated (the model file's sha256, dataset, eps, step size, seed, chunk size,
  number of images). A relaunch with other settings under the same name is refused.
* ``units/<attack>/chunk-NNNNN.parquet``: the per-image results of one attack on one chunk (``index``,
  ``correct`` and what the attack adds, e.g. AutoAttack's ``aa_stage``), plus the ``launch`` that made it.
  Written by the driver (whole: ``storage.write_bytes``) the moment the unit finishes.
* ``per_image.parquet``: every image's results side by side, and its worst case, written at the end.

A chunk's results do not depend on the process that attacks it (raydistill.evaluation: its randomness is
seeded with ``seed + chunk``), so 1, 2 or N workers, and any interruption, give the same figures image by
image. The workers get the model and the images from the Ray object store: they need no storage access.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from . import storage
from .errors import UsageError
from .evaluation import ATTACKS, chunks_of

FORMAT = 1  # of the stored results; part of the key, so results of an older format are never reused
UNITS = "units"
PER_IMAGE = "per_image.parquet"
MANIFEST = "evaluation.json"


@dataclass(frozen=True)
class EvalSpec:
    """What is evaluated: the identity of the stored results."""

    model_sha256: str
    dataset: str
    eps: float
    step_size: float
    seed: int
    batch_size: int
    n_examples: int

    def key(self) -> str:
        text = json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ============================================================================= the stored results
class ResultStore:
    """The per-unit Parquet files of one evaluation (see the module's docstring)."""

    def __init__(self, folder: str, spec: EvalSpec):
        self.folder, self.spec = folder, spec
        self.launch = uuid.uuid4().hex[:8]

    def open(self, checkpoint: str) -> None:
        """Create the folder, or check that the one there holds this evaluation."""
        manifest = storage.join(self.folder, MANIFEST)
        want = {"format": FORMAT, "spec": asdict(self.spec), "key": self.spec.key(), "checkpoint": checkpoint}
        if storage.exists(manifest):
            have = json.loads(storage.read_bytes(manifest))
            if have.get("key") != want["key"]:
                diff = [k for k in want["spec"] if have.get("spec", {}).get(k) != want["spec"][k]]
                raise UsageError(f"evaluation '{self.folder}' holds another evaluation (it differs in "
                                 f"{', '.join(diff) or 'format'}); give another --name or delete that folder")
            return
        storage.write_bytes(manifest, (json.dumps(want, indent=2) + "\n").encode())

    def unit_uri(self, attack: str, chunk: int) -> str:
        return storage.join(self.folder, UNITS, attack, f"chunk-{chunk:05d}.parquet")

    def done(self, attacks: list[str]) -> set[tuple[str, int]]:
        out = set()
        for attack in attacks:
            for name, is_dir in storage.list_dir(storage.join(self.folder, UNITS, attack)):
                if not is_dir and name.startswith("chunk-") and name.endswith(".parquet"):
                    out.add((attack, int(name[len("chunk-"):-len(".parquet")])))
        return out

    def write(self, attack: str, chunk: int, columns: dict[str, np.ndarray], seconds: float, worker: str) -> None:
        import pyarrow as pa

        lo, hi = chunks_of(self.spec.n_examples, self.spec.batch_size)[chunk]
        table = pa.table({"index": np.arange(lo, hi, dtype=np.int64), **columns, "launch": [self.launch] * (hi - lo),
                          "worker": [worker] * (hi - lo), "seconds": np.full(hi - lo, seconds / (hi - lo))})
        _write_table(self.unit_uri(attack, chunk), table)

    def read(self, attacks: list[str]):
        """Every stored unit of ``attacks`` as one pyarrow table per attack, rows in image order."""
        import pyarrow as pa

        out = {}
        for attack in attacks:
            n_chunks = len(chunks_of(self.spec.n_examples, self.spec.batch_size))
            tables = [_read_table(self.unit_uri(attack, c)) for c in range(n_chunks)]
            out[attack] = pa.concat_tables(tables)
        return out


def _write_table(uri: str, table) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue().to_pybytes())


def _read_table(uri: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(storage.read_bytes(uri)))


# ============================================================================= running the units
def _numpy(columns: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in columns.items()}


class _Shard:
    """A Ray worker: the model and the evaluated images once, then any (attack, chunk) unit asked for."""

    def __init__(self, model, images, labels, eps: float, step_size: float, seed: int, batch_size: int):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(device).eval()
        self.x, self.y, self.device = images, labels, device
        self.settings = dict(eps=eps, step_size=step_size)
        self.seed, self.ranges = seed, chunks_of(len(labels), batch_size)
        self.worker = f"{_node_id()}/{os.getpid()}"

    def run(self, attack: str, chunk: int) -> tuple[dict[str, np.ndarray], float, str]:
        from .data import to_float
        from .evaluation import attack_chunk

        start = time.perf_counter()
        lo, hi = self.ranges[chunk]
        x, y = to_float(self.x[lo:hi].to(self.device)), self.y[lo:hi].to(self.device)
        cols = attack_chunk(self.model, x, y, attack, seed=self.seed + chunk, **self.settings)
        return _numpy(cols), time.perf_counter() - start, self.worker


def _node_id() -> str:
    """The Ray node this process runs on (its first 8 hex digits), or "local" outside Ray."""
    ray = sys.modules.get("ray")  # never imported here: an in-process evaluation runs where Ray is absent
    if ray is not None:
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()[:8]
    return "local"


class Progress:
    """One stderr line when an attack is done, else at most one every ``every_s`` seconds."""

    def __init__(self, totals: dict[str, int], done: dict[str, int], quiet: bool, every_s: float = 10.0):
        self.totals, self.done, self.quiet, self.every_s = totals, done, quiet, every_s
        self.start = self.last = time.perf_counter()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[evaluate] {text}", file=sys.stderr, flush=True)

    def unit_done(self, attack: str, workers: str) -> None:
        self.done[attack] += 1
        now = time.perf_counter()
        if self.done[attack] == self.totals[attack] or now - self.last >= self.every_s:
            self.last = now
            left = sum(self.totals.values()) - sum(self.done.values())
            self.say(f"{attack}: {self.done[attack]}/{self.totals[attack]} batches{workers}, "
                     f"{now - self.start:.0f}s, {left} units left")


def run_units(store: ResultStore, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[str], *,
              workers: int = 0, gpus_per_worker: float | None = None, cpus_per_worker: int | None = None,
              worker_wait: float = 600.0, device: torch.device | None = None, quiet: bool = False,
              on_unit: Callable[[str, int], None] | None = None) -> int:
    """Attack every unit of ``attacks`` not stored yet, storing each as it finishes; returns how many ran.
    ``workers`` 0: in this process on ``device``; N: N Ray workers (the cluster in RAY_ADDRESS, else a local
    Ray instance; as many as its free resources hold, see raydistill.evalpool; none placeable within ``worker_wait``
    seconds: evalpool.WorkersUnavailable). ``on_unit(attack, chunk)`` runs after each stored unit (tests stop an
    evaluation with it)."""
    spec = store.spec
    n_chunks = len(chunks_of(spec.n_examples, spec.batch_size))
    done = store.done(attacks)
    todo = collections.deque((a, c) for a in attacks for c in range(n_chunks) if (a, c) not in done)
    progress = Progress({a: n_chunks for a in attacks}, {a: sum(1 for d in done if d[0] == a) for a in attacks}, quiet)
    total = len(attacks) * n_chunks
    if done:
        progress.say(f"resuming {store.folder}: {len(done)} of {total} (attack, batch) units already done")
    if not todo:
        return 0
    progress.say(f"{len(todo)} units ({', '.join(attacks)} on {n_chunks} batches of up to {spec.batch_size}) "
                 f"{'in this process' if not workers else f'on up to {workers} Ray workers'} -> {store.folder}")
    x, y = x[:spec.n_examples], y[:spec.n_examples]
    if not workers:
        shard = _Shard(model, x, y, spec.eps, spec.step_size, spec.seed, spec.batch_size)
        if device is not None:
            shard.model, shard.device = model.to(device), device
        ran = 0
        while todo:
            attack, chunk = todo.popleft()
            cols, seconds, worker = shard.run(attack, chunk)
            store.write(attack, chunk, cols, seconds, worker)
            ran += 1
            progress.unit_done(attack, "")
            if on_unit:
                on_unit(attack, chunk)
        return ran
    return _run_on_ray(store, model, x, y, todo, workers, gpus_per_worker, cpus_per_worker, worker_wait, progress, on_unit)


def _run_on_ray(store, model, x, y, todo, workers, gpus_per_worker, cpus_per_worker, worker_wait, progress, on_unit) -> int:
    """The units on Ray actors (raydistill.evalpool): as many as the free resources hold, up to ``workers``."""
    import ray

    from . import evalpool
    from .train import init_ray

    init_ray()
    n, cpus, gpus_each, note = evalpool.plan_workers(workers, gpus_per_worker, cpus_per_worker)
    if note:
        progress.say(note)
    spec = store.spec
    refs = ray.put(model.cpu()), ray.put(x), ray.put(y)
    actor_cls = ray.remote(_Shard).options(num_cpus=cpus, num_gpus=gpus_each, scheduling_strategy="SPREAD")
    need = ", ".join(f"{k} {v:g}" for k, v in (("CPU", cpus), ("GPU", gpus_each)) if v)

    def stored(attack: str, chunk: int, result, live: int) -> None:
        cols, seconds, worker = result
        store.write(attack, chunk, cols, seconds, worker)
        progress.unit_done(attack, f" ({live} worker{'s' if live > 1 else ''})")
        if on_unit:
            on_unit(attack, chunk)

    return evalpool.run(lambda: actor_cls.remote(*refs, spec.eps, spec.step_size, spec.seed, spec.batch_size), todo,
                        workers=n, worker_wait=worker_wait, need=need, say=progress.say, on_result=stored)


# ============================================================================= the figures
@dataclass
class Results:
    """Per-image results side by side (``table``: index, label, one bool column per attack, ``aa_stage``,
    ``zero_grad``, ``worst``) and the figures made from them."""

    table: Any
    accuracy: dict[str, float]          # attack -> robust accuracy (every attack run)
    worst_acc: float | None             # per image, correct under every threat-model attack run
    aa_components: dict[str, float]     # AutoAttack: robust accuracy after each component, as AutoAttack logs it
    aa_fooled: dict[str, int]           # AutoAttack: images each component fooled first


def combine(store: ResultStore, attacks: list[str], labels: torch.Tensor) -> Results:
    """The per-image table and figures of ``attacks`` (all units stored)."""
    import pyarrow as pa

    from .evaluation import AA_STAGES

    n = store.spec.n_examples
    tables = store.read(attacks)
    cols: dict[str, Any] = {"index": np.arange(n, dtype=np.int64), "label": labels[:n].cpu().numpy().astype(np.int64)}
    accuracy, worst = {}, None
    aa_components, aa_fooled = {}, {}
    for attack in attacks:
        t = tables[attack]
        if not np.array_equal(t.column("index").to_numpy(), cols["index"]):
            raise RuntimeError(f"stored results of {attack} do not cover images 0..{n - 1} once each")
        if "correct" in t.column_names:
            correct = t.column("correct").to_numpy(zero_copy_only=False).astype(bool)
            cols[attack] = correct
            accuracy[attack] = float(correct.mean())
            if ATTACKS.get(attack).threat:
                worst = correct if worst is None else worst & correct
        if "zero_grad" in t.column_names:
            cols["zero_grad"] = t.column("zero_grad").to_numpy(zero_copy_only=False).astype(bool)
        if "aa_stage" in t.column_names:
            stage = t.column("aa_stage").to_numpy().astype(np.int64)
            cols["aa_stage"] = np.array([AA_STAGES[s] if s >= 0 else "" for s in stage], dtype=object)
            for k, name in enumerate(AA_STAGES[1:], start=1):
                aa_fooled[name] = int((stage == k).sum())
                aa_components[name] = float(((stage < 0) | (stage > k)).mean())
    if worst is not None:
        cols["worst"] = worst
    return Results(pa.table(cols), accuracy, None if worst is None else float(worst.mean()), aa_components, aa_fooled)


def write_per_image(store: ResultStore, results: Results) -> str:
    uri = storage.join(store.folder, PER_IMAGE)
    _write_table(uri, results.table)
    return uri
