"""``python -m raydistill.study STUDY.yaml [options]``: validate a study, print its plan (--dry-run) or run it.

The study file is validated and every run's configuration built before anything is created: a bad
file or option is ONE ``error:`` line and exit code 2. ``--dry-run`` creates nothing (no folder, no
MLflow store) and imports neither Ray nor MLflow.
"""
from __future__ import annotations

from .. import plugins
from ..cli import ArgParser
from ..errors import UsageError, cli_entry


def parser() -> ArgParser:
    p = ArgParser(prog="python -m raydistill.study",
                  description="A comparison study: an equal-budget search per method, seeded final runs, "
                              "their evaluation on the same test images, the papers' table (docs/studies.md).")
    p.add_argument("study", help="the study file (YAML), or the name of one in studies/ (e.g. quickstart)")
    p.add_argument("--name", help="study name (default: the file's `study:`); relaunching with --resume continues it")
    p.add_argument("--resume", action="store_true", help="continue the interrupted study --name")
    p.add_argument("--storage-path", help="runs and checkpoints: a folder or a URI (s3://, gs://); default "
                                          "$RAYDISTILL_STORAGE, else ~/ray_results")
    p.add_argument("--tracking-uri", help="MLflow tracking URI: sqlite:///FILE, http(s)://HOST:PORT, databricks or a folder (its mlflow.db) (default: MLflow's own default)")
    p.add_argument("--summary-json", help="write the study summary JSON here when the study ends")
    p.add_argument("--dry-run", action="store_true", help="validate the study and print its plan (stages, runs, "
                                                          "budgets, estimated device-hours); run and create nothing")
    p.add_argument("--allow-changed-plugin", action="store_true",
                   help="with --resume: continue although a plugin the study uses changed since it started (refused "
                        "otherwise); the change is recorded and its table says which rows span two versions")
    plugins.add_option(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..plugin_checks import check_config
    from . import load_study
    from .show import format_plan

    args = parser().parse_args(argv)
    plugins.use(args.plugin)
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        raise UsageError(f"--name {args.name!r} must be a plain folder name (no '/', not starting with '.')")
    for flag, value in (("--storage-path", args.storage_path), ("--tracking-uri", args.tracking_uri),
                        ("--summary-json", args.summary_json)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag} is empty; give a path or URI")
    plan = load_study(args.study, name=args.name, storage_path=args.storage_path, tracking_uri=args.tracking_uri,
                      allow_changed_plugin=args.allow_changed_plugin)
    for run in plan.runs():  # a plugin's model and method on 2 images, before anything runs (dry run too)
        if run.config is not None:
            check_config(run.config)
    if args.dry_run:
        print(format_plan(plan))
        print("\ndry run: nothing was run or created" + (f"; --summary-json {args.summary_json} not written"
                                                          if args.summary_json else ""))
        return 0
    from .runner import run_study

    return run_study(plan, args)


run = cli_entry(main)

if __name__ == "__main__":
    run()
