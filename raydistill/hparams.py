"""The valid ranges of method hyperparameters.

Every numeric hyperparameter of a method declares its range in the method's ``ranges`` (see
raydistill.methods.base.Method.check_value). The named ranges say what kind of quantity it is:

* ``WEIGHT``       >= 0      a loss term's weight (0 switches the term off)
* ``NON_NEGATIVE`` >= 0      any other quantity that may be 0 (an exponent, a step where 0 = default)
* ``POSITIVE``     > 0       temperatures, search radius, kernel bandwidth
* ``FRACTION``     [0, 1]    a convex-combination weight: w·A + (1 - w)·B
* ``COUNT``        >= 0      an integer count that may be 0 (warm-up epochs)
* ``AT_LEAST_ONE`` >= 1      an integer count that must be positive (networks, attack iterations)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """The interval [low, high] of valid values; either end may be open or absent (None: unbounded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, value: float) -> str | None:
        """None when ``value`` lies in the range, else what is required (e.g. ``must be > 0``)."""
        return None if self.contains(value) else f"must be {self}"

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "finite"


WEIGHT = Range(0)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)
COUNT = Range(0)
AT_LEAST_ONE = Range(1)
