"""``python -m raydistill.study STUDY.yaml``: a comparison study of several methods.

A study file (docs/studies.md) names the dataset, the student, the threat model, the teachers the
offline methods share, the methods, one search budget for all of them, the final runs' seeds and
schedule, and the evaluation. It is validated on load (:mod:`.spec`), every run's configuration is
built through ``config.resolve`` and estimated (:mod:`.plan`, :mod:`.cost`), and ``--dry-run``
prints that plan (:func:`.show.format_plan`). :mod:`.runner` runs it.
"""
from __future__ import annotations

from pathlib import Path

from .plan import Plan, Run, Stage, build_plan
from .show import format_plan
from .spec import StudySpec, load

STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"


def find(name_or_path: str) -> Path:
    """A study file: the path given, else ``studies/NAME.yaml`` in the working folder or beside the package."""
    p = Path(name_or_path)
    if p.exists() or p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        return p
    for base in (Path.cwd() / "studies", STUDIES_DIR):
        if (base / f"{name_or_path}.yaml").is_file():
            return base / f"{name_or_path}.yaml"
    return p


def load_study(name_or_path: str, name: str | None = None, storage_path: str | None = None,
               tracking_uri: str | None = None, allow_changed_plugin: bool = False) -> Plan:
    """Read, check and plan a study (raises UsageError, one line, before anything is created)."""
    path = find(name_or_path)
    return build_plan(load(path, label=name_or_path if path == Path(name_or_path) else str(path)),
                      name=name, storage_path=storage_path, tracking_uri=tracking_uri,
                      allow_changed_plugin=allow_changed_plugin)


def run(argv: list[str] | None = None) -> None:
    """The command (``raydistill study ...``, ``python -m raydistill.study ...``): see :mod:`.__main__`."""
    from .__main__ import run as command

    command(argv)


__all__ = ["Plan", "Run", "Stage", "StudySpec", "build_plan", "find", "format_plan", "load", "load_study"]
