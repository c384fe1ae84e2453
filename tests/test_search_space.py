"""Search spaces: every shipped file loads and samples valid values; bad files are one-line errors."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from raydistill import search_space
from raydistill.config import resolve
from raydistill.errors import UsageError
from raydistill.methods import METHODS
from raydistill.schedules import Schedule

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_has_a_valid_search_space(method):
    space = search_space.load(method, SPACES / f"{method}.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):  # sampled values always make a valid config
        values = {**space.fixed, **space.sample(study.ask())}
        resolve(method, {"epochs": 10, "teacher": __file__, "natural_teacher": __file__}, trial=values)


def test_conditional_and_schedule_parameters():
    space = search_space.load("trades", SPACES / "trades.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    kinds = set()
    for _ in range(30):
        t = study.ask()
        values = space.sample(t)
        cfg = resolve("trades", {"epochs": 20}, trial=values)
        beta = cfg.hp["beta"]
        kinds.add(type(beta).__name__)
        if isinstance(beta, Schedule):
            assert beta(0) == 0.0 and beta(20) == pytest.approx(values["beta"]["end"]) and beta.e1 <= 10
            assert "beta.to" in t.params
        else:
            assert "beta.to" not in t.params  # conditional: only sampled for a ramp
    assert kinds == {"float", "Schedule"}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needle", [
    ("params: {beta: {float: [1, 2]}\n", "not valid YAML at line"),
    ("params: {beta: {float: [3, 2]}}\n", "params.beta.float: low 3 is above high 2"),
    ("params: {gamma: {float: [1, 2]}}\n", "gamma: trades has no hyperparameter 'gamma'"),
    ("params: {beta: {float: [0, 2], log: true}}\n", "params.beta.log: a log scale needs low > 0"),
    ("params: {beta: {float: [-1, 2]}}\n", "beta of trades must be >= 0"),  # ranges, not only types
    ("params: {beta: {schedule: {kind: [linear], value: 2.0, start: -1.0}}}\n", "beta of trades must be >= 0"),
    ("params: {beta: {uniform: [0, 2]}}\n", "params.beta: expected exactly one of"),
    ("params: {beta: {float: [1, 2], when: {kl_reduction: mean}}}\n", "'kl_reduction' is not a parameter listed before"),
    ("params: {beta: {float: [1, 2]}}\nextra: 1\n", "extra: unknown key"),
    ("method: pgd_at\nparams: {beta: {float: [1, 2]}}\n", "the file is for 'pgd_at'"),
    ("params: {}\n", "params: expected a non-empty mapping"),
    ("params: {kl_reduction: {categorical: [sum, mean]}}\n", "kl_reduction"),
    ("params: {beta: {schedule: {value: 1.0, to: 1.5}}}\n", "schedule.to: warm-up epochs are fractions"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_search_space_names_file_and_key(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(UsageError) as exc:
        search_space.load("trades", p)
    msg = str(exc.value)
    assert str(p) in msg and needle in msg, msg


def test_missing_search_space_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        search_space.load("trades", tmp_path / "nope.yaml")
