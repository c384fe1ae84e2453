"""``python -m raydistill.quickstart``: the README's first command.

A quickstart search of PeerAiD's hyperparameters (8 trials, TPE + ASHA) on scikit-learn's bundled
8x8 digits: works offline and finishes in minutes on 2 CPUs. Everything lands in MLflow's default
store (./mlflow.db); the command prints how to open the UI on it. Extra arguments go to
``python -m raydistill.tune``.
"""
from __future__ import annotations

import sys

from .errors import cli_entry


def main(argv: list[str] | None = None) -> int:
    from . import tune

    argv = list(argv if argv is not None else sys.argv[1:])
    code = tune.main(["peeraid", "--preset", "quickstart", "--summary-json", "quickstart-summary.json", *argv]) or 0
    if not code:
        print("\nSummary: quickstart-summary.json\nOpen the MLflow UI on these runs:\n"
              "  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlflow.db "
              "--host 127.0.0.1 --port 5000\n  then browse http://127.0.0.1:5000 (experiment 'raydistill')")
    return code


run = cli_entry(main)

if __name__ == "__main__":
    run()
