"""Running a study's plan: the stages in order (teachers, search, final runs, evaluation, report).

Not built yet: :func:`run_study` is the one entry point that the runner will replace.
"""
from __future__ import annotations

import argparse

from ..errors import UsageError
from .plan import Plan


def run_study(plan: Plan, args: argparse.Namespace) -> int:
    """Run ``plan`` (``args``: the command line: resume, summary_json...); returns the exit code."""
    raise UsageError("running a study is not built yet; --dry-run prints its plan")
