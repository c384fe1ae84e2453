"""Hyperparameter ranges (raydistill.hparams) and Method.check_value.

* Every int / float hyperparameter of every registered method declares its range, and every
  default and every paper preset value lies in it.
* Out-of-range numbers and schedules that reach outside the range are refused with one line
  ``--set NAME=VALUE: NAME of METHOD must be RANGE``; values in range (and non-numbers) pass.
"""
from __future__ import annotations

import pytest

from raydistill.errors import UsageError
from raydistill.hparams import AT_LEAST_ONE, FRACTION, POSITIVE, WEIGHT, Range
from raydistill.methods import METHODS, get_method
from raydistill.schedules import parse_schedule


def numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_range_bounds_and_text():
    assert (str(WEIGHT), str(POSITIVE), str(FRACTION), str(AT_LEAST_ONE)) == (">= 0", "> 0", "in [0, 1]", ">= 1")
    assert str(Range(0, 1, low_open=True)) == "in (0, 1]" and str(Range(high=2, high_open=True)) == "< 2"
    assert WEIGHT.check(0.0) is None and POSITIVE.check(0.0) == "must be > 0"
    assert FRACTION.check(1.0) is None and FRACTION.check(1.5) == "must be in [0, 1]"
    assert POSITIVE.check(float("inf")) == "must be > 0" and WEIGHT.check(float("nan")) is not None


@pytest.mark.parametrize("name", METHODS.names())
def test_every_numeric_hparam_has_a_range_holding_its_default_and_presets(name):
    cls = get_method(name)
    numbers = {k for k, v in cls.hparams.items() if numeric(v)}
    assert numbers == set(cls.ranges), "ranges must cover exactly the int / float hyperparameters"
    for k in numbers:
        cls.check_value(k, cls.hparams[k])
    for dataset, preset in cls.presets.items():
        for k, v in preset.get("hp", {}).items():
            assert k in cls.hparams, (dataset, k)
            cls.check_value(k, v)


def test_negative_temperature_refused():
    with pytest.raises(UsageError) as err:
        get_method("peeraid").check_value("tau", -1.0)
    assert str(err.value) == "--set tau=-1: tau of peeraid must be > 0"
    with pytest.raises(UsageError, match="tau_p of peeraid must be > 0"):
        get_method("peeraid").check_value("tau_p", 0.0)


@pytest.mark.parametrize("name,hp", [("ard", "alpha"), ("rslad", "alpha"), ("adaad", "alpha"), ("adaiad", "alpha"),
                                     ("iad1", "lambda"), ("at_aka", "alpha"), ("cat_aka", "alpha")])
def test_convex_weight_above_one_refused(name, hp):
    """alpha (lambda of IAD-I) weighs w * A + (1 - w) * B: a fraction."""
    with pytest.raises(UsageError) as err:
        get_method(name).check_value(hp, 1.5)
    assert str(err.value) == f"--set {hp}=1.5: {hp} of {name} must be in [0, 1]"
    get_method(name).check_value(hp, 0.0)
    get_method(name).check_value(hp, 1.0)


def test_loss_weights_may_exceed_one_but_not_go_negative():
    cls = get_method("peeraid")
    cls.check_value("gamma2", 100.0)  # TinyImageNet's setting
    with pytest.raises(UsageError, match="--set lambda3=-0.5: lambda3 of peeraid must be >= 0"):
        cls.check_value("lambda3", -0.5)


def test_counts():
    with pytest.raises(UsageError, match="--set n_teachers=0: n_teachers of at_aka must be >= 1"):
        get_method("at_aka").check_value("n_teachers", 0)
    with pytest.raises(UsageError, match="--set warmup=-1: warmup of iad1 must be >= 0"):
        get_method("iad1").check_value("warmup", -1)
    get_method("iad1").check_value("warmup", 0)


def test_schedule_reaching_out_of_range_refused():
    with pytest.raises(UsageError) as err:
        get_method("peeraid").check_value("tau", parse_schedule("linear(-1,5,0,10)"))
    assert str(err.value) == "--set tau=linear(-1,5,0,10): tau of peeraid must be > 0 at every epoch (it takes -1)"
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=r"alpha of rslad must be in \[0, 1\] at every epoch \(it takes 1.5\)"):
        get_method("rslad").check_value("alpha", parse_schedule("step(0.5,1.5,40)"))


def test_schedule_in_range_accepted():
    get_method("rslad").check_value("alpha", parse_schedule("linear(0,1,0,10)"))
    get_method("peeraid").check_value("tau", parse_schedule("step(5,1,40)"))
    get_method("peeraid").check_value("tau", parse_schedule({"kind": "linear", "start": 1, "end": 5, "from": 0, "to": 10}))


def test_non_numbers_and_unranged_names_pass():
    cls = get_method("ard")
    cls.check_value("kl_reduction", "mean")  # a choice: the configuration checks it
    cls.check_value("teacher_input", "adv")
    get_method("peeraid").check_value("detach_clean_in_self_kl", True)
