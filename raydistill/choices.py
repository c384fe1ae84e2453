"""The options' choice lists, each in one place: below both the option table (:mod:`raydistill.config`)
and the modules that implement the choices (:mod:`raydistill.fastpath`, :mod:`raydistill.evaluation`),
so that the configuration never imports what it configures. Imports nothing of raydistill but its errors.

* ``PRECISIONS``: ``--precision`` (fastpath's docstring states the policy of each).
* ``COMPILE_MODES``: ``--compile`` (fastpath: none, the attack's networks, or all forwards and backwards).
* ``ATTACKS``: the evaluation attacks ``--attacks`` and ``--test-attacks`` offer, in their table's order;
  ``CHECKS``: the gradient-masking checks ``--sanity`` adds, never offered. raydistill.evaluation
  registers one implementation for each name, and refuses to import when the two lists differ.
"""
from __future__ import annotations

from typing import Iterable

from .errors import UsageError

PRECISIONS = ("fp32", "tf32", "bf16")
COMPILE_MODES = ("none", "attack", "all")
ATTACKS = ("clean", "fgsm", "pgd10", "pgd20", "pgd50", "pgd100", "cw", "cw2", "aa")
CHECKS = ("pgd100_eps1", "zero_grad")
DEFAULT_TEST_ATTACKS = ("clean", "fgsm", "pgd20")  # train's final test (--test-attacks)
DEFAULT_EVAL_ATTACKS = ("clean", "fgsm", "pgd20", "cw")  # the evaluate command (--attacks)


def parse_attacks(text: str | Iterable[str], hidden: bool = False) -> list[str]:
    """``"clean,fgsm,pgd20"`` (or a list) -> validated attack names, duplicates dropped, order kept;
    ``hidden``: the checks (``CHECKS``) are accepted too."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    choices = ATTACKS + CHECKS if hidden else ATTACKS
    if not names:
        raise UsageError(f"no attack given; choose from: {', '.join(choices)}")
    for name in names:
        if name not in choices:
            raise UsageError(f"unknown attack '{name}'; choose from: {', '.join(choices)}")
    return list(dict.fromkeys(names))
