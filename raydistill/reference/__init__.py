"""The four papers' published result tables as reference data, each figure with its source.

``published.yaml`` (shipped with the package) holds every row of the PeerAiD, AdaAD, IAD and AT-AKA
result tables that maps to a raydistill method: the paper and table, the setting (dataset, student and
teacher architecture, eps, variant), the figures under raydistill's metric keys and ``source_row``, the
row's text in the paper. A figure is stored under the key of the SAME attack in raydistill's evaluation
(AdaAD's "PGD" is PGD-10: ``pgd10_acc``; its "CW" is CW_2: ``cw2_acc``); each table keeps the paper's
definition of every attack, and where a parameter differs from ours (IAD's FGSM random start, AT-AKA's
PGD step) a deviation note. Each row's ``training`` is the setting it came from as its paper states it
(``training.yaml``, raydistill.reference.training: epochs, schedule, weight decay, hyperparameters, with the
paper's sentences). docs/reference-figures.md says how to read and extend the files.

    from raydistill import reference
    row, = [r for r in reference.published("peeraid", "cifar10", student="resnet18") if r.table.number == "1"]
    row.metrics["aa_acc"], row.source                  # 0.5257, 'Jung et al., CVPR 2024, Table 1'
    reference.compare({"clean_acc": 0.86, "aa_acc": 0.52}, row)   # ours - published: clean +0.0099, aa -0.0057
    row.training.text()                                # '300 epochs, lr 0.1 x0.1 at 215,260,285, wd 0.0002'

No torch import: the report and the study read it cheaply.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from typing import Any, Mapping

import yaml

from ..errors import UsageError
from . import training as _training
from .training import Training, differences, expected, setting_text

__all__ = ["Paper", "Table", "Setting", "Row", "Training", "papers", "rows", "published", "compare", "figures",
           "source_problems", "differences", "expected", "setting_text", "METRIC_KEYS", "METHOD_KEYS",
           "ARCH_NAMES", "DATASET_NAMES", "DATA_FILE", "TRAINING_FILE"]

DATA_FILE = "published.yaml"
TRAINING_FILE = "training.yaml"
# raydistill's names (tests/test_reference.py checks them against the registries, which import torch)
METRIC_KEYS = ("clean_acc", "fgsm_acc", "pgd10_acc", "pgd20_acc", "cw_acc", "cw2_acc", "aa_acc")
METHOD_KEYS = ("natural", "pgd_at", "trades", "ard", "rslad", "akd2", "iad1", "iad2", "adaad", "adaiad",
               "peeraid", "at_aka", "cat_aka")
ARCH_NAMES = ("resnet18", "resnet34", "preact_resnet18", "wrn34_10", "wrn34_20", "wrn70_16", "mobilenet_v2",
              "vgg16", "small_cnn", "trades_smallcnn")
DATASET_NAMES = ("cifar10", "cifar100", "tinyimagenet", "digits", "synthetic", "mnist", "fashion_mnist")

# a printed figure: percentages with one or two decimals ("52.57", "0.0", "83.06%"); two decimals at most, so
# figures the extraction ran together ("85.4864.81") still split
_FIGURE = re.compile(r"\d+\.\d{1,2}")


def figures(text: str) -> list[float]:
    """The printed figures (percent) in ``text``, in order."""
    return [float(m) for m in _FIGURE.findall(text)]


@dataclass(frozen=True)
class Paper:
    key: str
    short: str           # "Jung et al., CVPR 2024"
    citation: str
    url: str | None
    code: str | None
    text: str            # file name of the text extraction the figures were read from (shared/papers/)


@dataclass(frozen=True)
class Table:
    paper: str
    number: str
    caption: str
    columns: tuple[str | None, ...]     # metric key of each printed column of one setting (None: not ours)
    column_names: tuple[str, ...]       # the paper's column headers
    groups: int                         # settings printed side by side, each with ``columns``
    attacks: Mapping[str, str]          # metric key -> the attack as this paper defines it
    deviations: Mapping[str, str]       # metric key -> how it differs from raydistill's attack of that key
    checkpoint: str                     # which checkpoint the table reports
    note: str | None = None


@dataclass(frozen=True)
class Setting:
    dataset: str
    student: str                  # raydistill ARCH
    student_name: str             # the paper's
    teacher: str | None = None    # ARCH (PeerAiD: the peer; AT-AKA: the online teachers); None: no teacher
    teacher_name: str | None = None
    teacher_method: str | None = None   # how the teacher was trained, when the paper says (a method key)
    eps: float = 8 / 255
    eps_text: str = "8/255"
    norm: str = "linf"
    variant: str | None = None    # how the row departs from the method's published setting
    hparams: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    paper: Paper
    table: Table
    method: str                   # raydistill method key
    method_name: str              # the paper's
    setting: Setting
    metrics: Mapping[str, float]  # metric key -> fraction in [0, 1]
    source_row: str               # the paper's row text (whitespace runs collapsed)
    picks: tuple[int, ...]        # positions in figures(source_row) of the metrics, in column order
    reconstructed: bool = False   # the reading of a scrambled extraction is inferred (see note)
    note: str | None = None
    expected_figures: int | None = None   # figures the source row must hold (None: explicit picks)
    training: Training | None = None      # the setting it came from, as the paper states it (training.yaml)

    @property
    def source(self) -> str:
        """e.g. ``Jung et al., CVPR 2024, Table 1``."""
        return f"{self.paper.short}, Table {self.table.number}"

    def attack(self, key: str) -> str:
        """How this row's paper defines the attack of metric ``key``."""
        return self.table.attacks[key]


def _eps(value: Any) -> float:
    try:
        return float(Fraction(str(value).replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"bad eps {value!r}; give a number or a fraction such as 8/255") from None


def _picks(columns: tuple, row: Mapping) -> tuple[int, ...]:
    if "picks" in row:
        return tuple(int(i) for i in row["picks"])
    group, (stack, place) = int(row.get("group", 0)), row.get("stack", (1, 0))
    return tuple((group * len(columns) + i) * stack + place for i, key in enumerate(columns) if key is not None)


class DataError(ValueError):
    """published.yaml is malformed (a packaging bug, not user input)."""


def _check(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise DataError(f"{DATA_FILE}: {where}: {what}")


def _table(raw: Mapping, paper: Mapping, where: str) -> Table:
    columns = tuple(raw["columns"])
    keys = [k for k in columns if k is not None]
    _check(set(keys) <= set(METRIC_KEYS), where, f"unknown metric key in {keys}")
    attacks = {**paper["attacks"], **raw.get("attacks", {})}
    _check(all(k in attacks for k in keys), where, "an attack definition is missing for a column")
    _check(len(raw["column_names"]) == len(columns), where, "column_names and columns differ in length")
    return Table(paper=raw["paper"], number=str(raw["table"]), caption=raw["caption"], columns=columns,
                 column_names=tuple(raw["column_names"]), groups=len(raw.get("groups") or [None]),
                 attacks={k: v for k, v in attacks.items() if k in keys},
                 deviations={k: v for k, v in {**paper.get("deviations", {}), **raw.get("deviations", {})}.items()
                             if k in keys},
                 checkpoint=raw.get("checkpoint", paper["checkpoint"]), note=raw.get("note"))


_SETTING_FIELDS = ("dataset", "student", "student_name", "teacher", "teacher_name", "teacher_method", "variant",
                   "hparams")


def _row(raw: Mapping, table: Table, paper: Paper, defaults: Mapping, where: str) -> Row:
    merged = {**defaults, **raw}
    method = merged.get("method")
    _check(method in METHOD_KEYS, where, f"unknown method {method!r}")
    _check(merged.get("dataset") in DATASET_NAMES, where, f"unknown dataset {merged.get('dataset')!r}")
    _check(merged.get("student") in ARCH_NAMES, where, f"unknown student {merged.get('student')!r}")
    _check(merged.get("teacher") in ARCH_NAMES + (None,), where, f"unknown teacher {merged.get('teacher')!r}")
    _check(merged.get("teacher_method") in METHOD_KEYS + (None,), where, "unknown teacher_method")
    metrics = {str(k): float(v) for k, v in (raw.get("metrics") or {}).items()}
    _check(list(metrics) == [k for k in table.columns if k is not None], where,
           f"metrics {list(metrics)} are not the table's columns {table.columns}")
    _check(all(0.0 <= v <= 1.0 for v in metrics.values()), where, "a metric outside [0, 1]")
    source = " ".join(str(raw.get("source_row") or "").split())
    _check(bool(source), where, "no source_row")
    eps_text = str(merged.get("eps", "8/255"))
    setting = Setting(**{f: merged.get(f) for f in _SETTING_FIELDS if f != "hparams"},
                      hparams=dict(merged.get("hparams") or {}), eps=_eps(eps_text), eps_text=eps_text,
                      norm=merged.get("norm", "linf"))
    expected = None if "picks" in raw else len(table.columns) * table.groups * int(raw.get("stack", (1, 0))[0])
    return Row(paper=paper, table=table, method=method, method_name=str(merged.get("name") or method),
               setting=setting, metrics=metrics, source_row=source, picks=_picks(table.columns, raw),
               reconstructed=bool(raw.get("reconstructed", False)), note=merged.get("note"),
               expected_figures=expected)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[dict[str, Paper], tuple[Row, ...]]:
    text = resources.files(__name__).joinpath(DATA_FILE).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    raw_papers = data["papers"]
    found = {key: Paper(key=key, short=p["short"], citation=p["citation"], url=p.get("url"), code=p.get("code"),
                        text=p["text"]) for key, p in raw_papers.items()}
    out: list[Row] = []
    for t, raw_table in enumerate(data["tables"]):
        paper_key = raw_table["paper"]
        _check(paper_key in found, f"tables[{t}]", f"unknown paper {paper_key!r}")
        raw_paper = raw_papers[paper_key]
        where = f"{paper_key} Table {raw_table['table']}"
        table = _table(raw_table, raw_paper, where)
        base = {"eps": raw_paper.get("eps", "8/255"), "norm": raw_paper.get("norm", "linf"),
                **(raw_table.get("defaults") or {})}
        groups = raw_table.get("groups") or [{}]
        for i, raw in enumerate(raw_table["rows"]):
            group = groups[int(raw.get("group", 0))]
            defaults = {**base, **{k: v for k, v in group.items() if k != "label"}}
            out.append(_row(raw, table, found[paper_key], defaults, f"{where}, row {i + 1}"))
    raw_training = yaml.safe_load(resources.files(__name__).joinpath(TRAINING_FILE).read_text(encoding="utf-8"))
    names = {"methods": METHOD_KEYS, "datasets": DATASET_NAMES, "students": ARCH_NAMES}


    def check(cond: bool, where: str, what: str) -> None:
        if not cond:
            raise DataError(f"{TRAINING_FILE}: {where}: {what}")

    entries = _training.load(raw_training["settings"], check, found, names)
    out = [dataclasses.replace(r, training=next((t for t in entries if t.covers(r)), None)) for r in out]
    return found, tuple(out)


def papers() -> dict[str, Paper]:
    """The papers, by key (peeraid, adaad, iad, at_aka)."""
    return dict(_load()[0])


def rows() -> list[Row]:
    """Every published row, in the file's order (paper, table, printed order)."""
    return list(_load()[1])


def _known(kind: str, value: str, names: tuple[str, ...]) -> None:
    if value not in names:
        raise UsageError(f"unknown {kind} {value!r}; choose from: {', '.join(names)}")


def published(method: str, dataset: str, student: str | None = None, eps: float | str | None = None, *,
              teacher: str | None = None, paper: str | None = None,
              reconstructed: bool = True) -> list[Row]:
    """The published rows of ``method`` on ``dataset`` (optionally: that student / teacher architecture, that
    eps such as ``8/255``, that paper key); ``reconstructed=False`` leaves out rows read from a scrambled
    extraction. An empty list where no paper reports the setting; UsageError for an unknown name."""
    _known("method", method, METHOD_KEYS)
    _known("dataset", dataset, DATASET_NAMES)
    if student is not None:
        _known("model", student, ARCH_NAMES)
    if teacher is not None:
        _known("model", teacher, ARCH_NAMES)
    if paper is not None:
        _known("paper", paper, tuple(papers()))
    want_eps = None if eps is None else _eps(eps)
    return [r for r in rows()
            if r.method == method and r.setting.dataset == dataset
            and (student is None or r.setting.student == student)
            and (teacher is None or r.setting.teacher == teacher)
            and (paper is None or r.paper.key == paper)
            and (want_eps is None or abs(r.setting.eps - want_eps) < 1e-9)
            and (reconstructed or not r.reconstructed)]


def compare(our_metrics: Mapping[str, Any], row: Row, *, strict: bool = False) -> dict[str, float]:
    """Ours minus published, per metric key both hold (fractions; rounded to 1e-9). ``our_metrics`` may use
    MLflow's ``test/<key>`` names. ``strict`` leaves out keys whose attack differs in a parameter from
    raydistill's (``row.table.deviations``)."""
    ours: dict[str, float] = {}
    for key, value in our_metrics.items():
        name = key[len("test/"):] if key.startswith("test/") else key
        if name in METRIC_KEYS and value is not None:
            ours[name] = float(value)
    return {key: round(ours[key] - published_value, 9) for key, published_value in row.metrics.items()
            if key in ours and not (strict and key in row.table.deviations)}


def source_problems(row: Row) -> list[str]:
    """Where ``row.metrics`` and the figures of ``row.source_row`` disagree (empty: they agree). Without
    explicit picks the row text must hold exactly the table's columns x groups x stacked rows figures."""
    found = figures(row.source_row)
    problems = []
    if max(row.picks, default=-1) >= len(found):
        return [f"picks {row.picks} beyond the {len(found)} figures of the source row"]
    for (key, value), pick in zip(row.metrics.items(), row.picks):
        if round(value * 100, 2) != found[pick]:
            problems.append(f"{key} = {value} but the source row prints {found[pick]} at position {pick}")
    if len(row.picks) != len(row.metrics):
        problems.append(f"{len(row.picks)} picks for {len(row.metrics)} metrics")
    if row.expected_figures is not None and len(found) != row.expected_figures:
        problems.append(f"the source row holds {len(found)} figures, the table's layout {row.expected_figures}")
    return problems
