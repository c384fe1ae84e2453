"""The one checkpoint format.

A checkpoint is a directory:

* ``model.pt``  - the deployable student: ``{"format": 1, "arch", "num_classes", "in_shape",
  "state_dict", "meta": {...}}`` where meta holds plain values (method, dataset, eps, step_size, ...).
  ``python -m raydistill.evaluate DIR`` and ``--teacher DIR`` read this file.
* ``last_model.pt`` - the same record of the student's weights at the end of the checkpoint's epoch.
* ``state.pt``  - the full training state used to resume (``TrainingState``: every trained network,
  its optimizer, the averaged weights, the epoch, the best record, the metric history, RNG states)
  and the run's config. Written on any device, read on the CPU and moved: a run resumes on another.

Every file is written atomically (temporary file + fsync + rename) and read with
``torch.load(weights_only=True)``: a checkpoint can never execute code.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UsageError

MODEL_FILE = "model.pt"
LAST_MODEL_FILE = "last_model.pt"
STATE_FILE = "state.pt"
FORMAT = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def local_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """The local torch file of ``path``: the file itself or a checkpoint folder's model.pt, a remote one
    (s3://, gs://) through the local cache; a missing one is a one-line UsageError."""
    from . import storage

    if storage.is_remote(path):  # read through the local cache (raydistill.storage)
        uri = str(path).rstrip("/")
        if not storage.exists(uri):
            raise UsageError(f"{what} '{uri}' does not exist; give a raydistill checkpoint folder or a .pt/.pth state_dict file")
        if storage.is_dir(uri):
            if not storage.exists(storage.join(uri, MODEL_FILE)):
                raise UsageError(f"{what} folder '{uri}' has no {MODEL_FILE}; give a raydistill checkpoint folder or a .pt/.pth file")
            uri = storage.join(uri, MODEL_FILE)
        path = storage.local_copy(uri, what)
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} '{path}' does not exist; give a raydistill checkpoint folder or a .pt/.pth state_dict file")
    if path.is_dir():
        path = path / MODEL_FILE
        if not path.exists():
            raise UsageError(f"{what} folder '{path.parent}' has no {MODEL_FILE}; give a raydistill checkpoint folder or a .pt/.pth file")
    return path


def safe_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Load a torch file (or a checkpoint folder's model.pt; local or remote: s3://, gs://) with
    weights_only=True; any failure is a one-line UsageError."""
    path = local_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise UsageError(f"{what} '{path}' was refused by the safe loader (weights_only=True): {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{what} '{path}' could not be read as a torch file: {first}") from None


def model_record(model: torch.nn.Module, arch: str, num_classes: int, in_shape, meta: dict) -> dict:
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "arch": arch, "num_classes": int(num_classes),
            "in_shape": [int(s) for s in in_shape], "state_dict": sd, "meta": dict(meta)}


def save_model(directory: str | os.PathLike, model: torch.nn.Module, arch: str, num_classes: int,
               in_shape, meta: dict) -> Path:
    directory = Path(directory)
    atomic_save(model_record(model, arch, num_classes, in_shape, meta), directory / MODEL_FILE)
    return directory


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               arch: str | None = None, num_classes: int | None = None,
               in_shape=None, what: str = "checkpoint"):
    """Build and load a model from a raydistill checkpoint or an external state_dict.

    Returns ``(model, meta)``. For an external file (plain state_dict, ``{'state_dict': ...}``,
    'module.'-prefixed keys) ``arch`` and ``num_classes`` must be given.
    """
    from .models import build_model, load_state_dict_into

    obj = safe_load(path, what)
    if isinstance(obj, dict) and obj.get("format") == FORMAT and "arch" in obj:
        ck_arch, ck_classes = obj["arch"], int(obj["num_classes"])
        ck_shape = tuple(obj["in_shape"])
        if arch is not None and arch != ck_arch:
            raise UsageError(f"{what} '{path}' holds a {ck_arch}, not the {arch} that was asked for")
        if num_classes is not None and num_classes != ck_classes:
            raise UsageError(f"{what} '{path}' has {ck_classes} classes, but the dataset has {num_classes}")
        if in_shape is not None and tuple(in_shape) != ck_shape:
            raise UsageError(f"{what} '{path}' was trained on inputs {tuple(ck_shape)}, but the dataset has {tuple(in_shape)}")
        from .provenance import require

        require("model", ck_arch, obj.get("meta") or {}, f"{what} '{path}'")  # a plugin's model: its plugin loaded
        model = build_model(ck_arch, ck_classes, ck_shape)
        load_state_dict_into(model, obj["state_dict"], source=str(path))
        meta = dict(obj.get("meta", {}))
        meta.update(arch=ck_arch, num_classes=ck_classes, in_shape=list(ck_shape))
        return model.to(device).eval(), meta
    if arch is None or num_classes is None:
        raise UsageError(f"{what} '{path}' is not a raydistill checkpoint; for an external state_dict give its architecture and class count")
    model = build_model(arch, num_classes, tuple(in_shape) if in_shape else (3, 32, 32))
    load_state_dict_into(model, obj, source=str(path))
    return model.to(device).eval(), {"arch": arch, "num_classes": num_classes,
                                     "in_shape": list(in_shape) if in_shape else [3, 32, 32]}


# ----------------------------------------------------------------------------- the training state
def read_state(directory: str | os.PathLike) -> dict:
    """The ``state.pt`` of a checkpoint folder, on the CPU whatever device wrote it."""
    return safe_load(Path(directory) / STATE_FILE, "resume checkpoint")


def cpu_copy(state_dict: dict) -> dict:
    """A state_dict with every tensor detached, copied to the CPU."""
    return {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in state_dict.items()}


class TrainingState:
    """Everything a resume needs, in the one place that writes and reads it (``state.pt``'s keys):

    ``nets`` and ``optimizers`` (every trained network, bare, and its optimizer, by name), ``swa`` (the
    averaged weights, or None), ``epoch`` (epochs completed), ``best`` (the best student by the validation
    accuracy ``selection``, "pgd10" or "clean" (Method.selection): ``score`` (that accuracy), ``by``
    (``selection``), ``clean`` and ``pgd10`` (its validation accuracies), ``epoch``, ``student``, its CPU
    ``state_dict`` (None before the first epoch), ``averaged``), ``history`` (every epoch's metrics) and
    ``rng`` (torch, python, and cuda on a cuda device). ``save`` adds the run's ``config`` (for readers; a
    resume takes the config it is given).
    """

    def __init__(self, nets: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                 swa: torch.optim.swa_utils.AveragedModel | None = None, *, student: str,
                 device: str | torch.device = "cpu", selection: str = "pgd10"):
        self.nets, self.optimizers, self.swa = nets, optimizers, swa
        self.device = torch.device(device)
        self.selection = selection
        self.epoch = 0
        self.best: dict[str, Any] = {"score": -1.0, "by": selection, "clean": -1.0, "pgd10": -1.0, "epoch": -1,
                                     "student": student, "state_dict": None}
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "nets": {n: cpu_copy(m.state_dict()) for n, m in self.nets.items()},
            "optimizers": {n: opt.state_dict() for n, opt in self.optimizers.items()},
            "swa": cpu_copy(self.swa.state_dict()) if self.swa is not None else None,
            "best": self.best,
            "history": self.history,
            "rng": {"torch": torch.get_rng_state(), "python": _listify(random.getstate()),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state`` (tensors on any device: each is copied to where its network lives;
        a cuda RNG state is restored on a cuda device only)."""
        for n, module in self.nets.items():
            module.load_state_dict(state["nets"][n])
            self.optimizers[n].load_state_dict(state["optimizers"][n])  # moves its state to the parameters' device
        if self.swa is not None and state.get("swa") is not None:
            self.swa.load_state_dict(state["swa"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best = rescored(state["best"], self.history, self.selection)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        random.setstate(_tuple(rng["python"]))
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)

    def consider_best(self, accs: dict[str, float], epoch: int, student: str, module: nn.Module, averaged: bool) -> None:
        """Keep a CPU copy of ``module``'s weights as the best checkpoint if its validation accuracy
        ``accs[selection]`` beats the best so far; ``accs`` (``{"clean": ..., "pgd10": ...}``) are kept with it."""
        score = accs[self.selection]
        if score > self.best["score"]:
            self.best = {"score": score, "by": self.selection, **accs, "epoch": epoch, "student": student,
                         "state_dict": cpu_copy(module.state_dict()), "averaged": averaged}

    def save(self, directory: str | os.PathLike, *, config: dict, student: str, arch: str, num_classes: int,
             in_shape, meta: dict) -> None:
        """Write a checkpoint folder: ``state.pt`` (this state and ``config``), ``model.pt`` (network
        ``student`` with the best weights, its current ones before there is a best) and ``last_model.pt``
        (its current weights)."""
        directory = Path(directory)
        state = dict(self.state_dict(), config=config)
        atomic_save(state, directory / STATE_FILE)
        model = self.nets[student]
        best = self.best
        best_meta = dict(meta, epoch=best["epoch"], val_pgd10_acc=best["pgd10"], val_clean_acc=best["clean"],
                         selected_by=f"val/{best['by']}_acc")
        atomic_save({**model_record(model, arch, num_classes, in_shape, best_meta),
                     "state_dict": self.best["state_dict"] or state["nets"][student]}, directory / MODEL_FILE)
        atomic_save(model_record(model, arch, num_classes, in_shape, dict(meta, epoch=self.epoch - 1)),
                    directory / LAST_MODEL_FILE)


def rescored(best: dict, history: list[dict], selection: str) -> dict:
    """``best`` as read from a checkpoint, scored by ``selection``. A checkpoint written before the selection
    was recorded (no ``score``) picked its best by PGD-10; when ``selection`` differs from what picked it, its
    score is its epoch's validation accuracy by ``selection`` from ``history`` (-1 where that is missing), so
    a later epoch replaces it only by beating it."""
    best = dict(best)
    row = next((h for h in history if int(h.get("epoch", 0)) == best["epoch"] + 1), {})
    prefix = "val/swa_" if best.get("averaged") else "val/"
    best.setdefault("clean", row.get(f"{prefix}clean_acc", -1.0))
    if "score" not in best:
        best.update(score=best["pgd10"], by="pgd10")
    if best["by"] != selection:
        best.update(score=row.get(f"{prefix}{selection}_acc", -1.0), by=selection)
    return best


def _listify(obj):  # random.getstate() is stored as nested lists (and read back as tuples)
    return [_listify(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _tuple(obj):
    return tuple(_tuple(o) for o in obj) if isinstance(obj, (tuple, list)) else obj
