"""Shared command-line helpers: an ArgumentParser whose errors are one ``error:`` line, and value checkers.

Every command builds its parser with :class:`ArgParser` and wraps its ``main`` in
:func:`raydistill.errors.cli_entry`, so a bad flag prints one line and exits with code 2.
The checkers are argparse ``type=`` functions; numbers may be written as fractions (``8/255``).
"""
from __future__ import annotations

import argparse
import math

from .errors import UsageError


class ArgParser(argparse.ArgumentParser):
    """ArgumentParser that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> "NoReturn":  # noqa: F821 - typing only
        raise UsageError(f"{message} (see {self.prog} --help)")


def _number(text: str) -> float:
    """Parse ``'0.5'``, ``'1e-3'`` or a fraction ``'8/255'``; raise ArgumentTypeError otherwise."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number (e.g. 0.03 or 8/255), got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number > 0 (fractions such as 2/255 allowed)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def nonneg_float(text: str) -> float:
    """A number >= 0 (fractions such as 8/255 allowed)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value
