"""Shared command-line helpers: an ArgumentParser whose errors are one ``error:`` line, and value checkers.

Every command builds its parser with :class:`ArgParser` and wraps its ``main`` in
:func:`raydistill.errors.cli_entry`, so a bad flag prints one line and exits with code 2.
The checkers are argparse ``type=`` functions; numbers may be written as fractions (``8/255``).
"""
from __future__ import annotations

import argparse
import math
from typing import NoReturn

from .errors import UsageError


class ArgParser(argparse.ArgumentParser):
    """ArgumentParser that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
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


def _checked(parse, ok, requirement: str, doc: str):
    """An argparse ``type=`` function: ``parse`` the text, then require ``ok(value)``."""
    def check(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    check.__doc__ = doc
    return check


positive_int = _checked(_integer, lambda v: v >= 1, "a positive integer", "An integer >= 1.")
nonneg_int = _checked(_integer, lambda v: v >= 0, "an integer >= 0", "An integer >= 0.")
positive_float = _checked(_number, lambda v: v > 0, "a number > 0", "A number > 0 (fractions such as 2/255 allowed).")
nonneg_float = _checked(_number, lambda v: v >= 0, "a number >= 0", "A number >= 0 (fractions such as 8/255 allowed).")
probability = _checked(_number, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]", "A number in [0, 1].")


def worker_count(text: str) -> int | tuple[int, int]:
    """``--workers``: a count N >= 0, or an elastic range MIN-MAX (1 <= MIN < MAX) as a tuple."""
    lo, sep, hi = str(text).partition("-")
    if not sep:
        return nonneg_int(text)
    try:
        pair = (int(lo), int(hi))
    except ValueError:
        pair = None
    if pair is None or not 1 <= pair[0] < pair[1]:
        raise argparse.ArgumentTypeError(f"must be a count N >= 0 or a range MIN-MAX with 1 <= MIN < MAX, got {text}")
    return pair


# ----------------------------------------------------------------------------- the `raydistill` command
COMMANDS = {"train": "one training run", "tune": "a hyperparameter search", "evaluate": "robustness evaluation of a checkpoint",
            "report": "the comparison table of runs in MLflow", "bench": "training-throughput benchmark",
            "study": "a comparison study of several methods"}


def main(argv: list[str] | None = None) -> None:
    """``raydistill COMMAND [options]``: the same as ``python -m raydistill.COMMAND [options]``."""
    import importlib
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: raydistill {" + ",".join(COMMANDS) + "} [options]\n\n" + "\n".join(
        f"  {name:<9} {text}" for name, text in COMMANDS.items()) + "\n\n`raydistill COMMAND --help` for its options"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        sys.exit(0 if argv else 2)
    name = argv[0]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    try:
        module = importlib.import_module(f"raydistill.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"raydistill.{name}":
            raise
        print(f"error: command '{name}' is not available in this version of raydistill", file=sys.stderr)
        sys.exit(2)
    entry = getattr(module, "run", None) or module.main
    sys.argv = [f"raydistill {name}", *argv[1:]]
    entry(argv[1:])
