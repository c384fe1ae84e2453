"""``python -m raydistill.quickstart``: the README's first command.

Trains PGD-AT on scikit-learn's bundled 8x8 digits (works offline, a couple of minutes on 2 CPUs)
under Ray Train, then evaluates the best checkpoint against FGSM, PGD-20 and CW-inf.
"""
from __future__ import annotations

import sys

from .errors import cli_entry


def main(argv: list[str] | None = None) -> int:
    from . import evaluate, train

    argv = list(argv if argv is not None else sys.argv[1:])
    summary_path = "quickstart-summary.json"
    code = _call(train.main, ["pgd_at", "--preset", "quickstart",
                              "--summary-json", summary_path, *argv])
    if code:
        return code
    import json

    ckpt = json.load(open(summary_path))["checkpoint"]
    print(f"\nEvaluating {ckpt}")
    code = _call(evaluate.main, [ckpt, "--attacks", "clean,fgsm,pgd20,cw"])
    if not code:
        print("\nOpen the MLflow UI on these runs:  mlflow ui --backend-store-uri sqlite:///mlflow.db  (http://127.0.0.1:5000)")
    return code


def _call(fn, argv: list[str]) -> int:
    return fn(argv) or 0


run = cli_entry(main)

if __name__ == "__main__":
    run()
