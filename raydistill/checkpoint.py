"""The one checkpoint format.

A checkpoint is a directory:

* ``model.pt``  - the deployable student: ``{"format": 1, "arch", "num_classes", "in_shape",
  "state_dict", "meta": {...}}`` where meta holds plain values (method, dataset, eps, step_size, ...).
  ``python -m raydistill.evaluate DIR`` and ``--teacher DIR`` read this file.
* ``state.pt``  - the full training state (every network, optimizer, scheduler, averaged weights,
  epoch, RNG states, metric history) used to resume.

Every file is written atomically (temporary file + fsync + rename) and read with
``torch.load(weights_only=True)``: a checkpoint can never execute code.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

MODEL_FILE = "model.pt"
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


def safe_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Load a torch file with weights_only=True; any failure is a one-line UsageError."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} '{path}' does not exist; give a raydistill checkpoint folder or a .pt/.pth state_dict file")
    if path.is_dir():
        path = path / MODEL_FILE
        if not path.exists():
            raise UsageError(f"{what} folder '{path.parent}' has no {MODEL_FILE}; give a raydistill checkpoint folder or a .pt/.pth file")
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
