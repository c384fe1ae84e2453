"""The study file and its plan: the shipped studies validate and dry-run; bad files and options are one
``error:`` line naming the file and the key, exit code 2, and nothing created.

Every command line runs as a real subprocess (``python -m raydistill.study ...``), all of them at once
(most fail before PyTorch is imported), each in a folder of its own that is also its HOME and holds its
--storage-path: after it, the folder holds only what the test put there.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE = "dataset: digits\nstudent: small_cnn\n"
SEARCH = "search: {budget: {trial_epochs: 4}, epochs: 2}\n"
OK = BASE + "methods: [pgd_at]\n" + SEARCH

# name -> (study file text, the key path the error must name)
BAD_FILES = {
    "unknown_key": (OK + "bogus: 1\n", ": bogus: unknown key; accepted: study, dataset,"),
    "yaml_syntax": (BASE + "methods: [pgd_at\n" + SEARCH, ": line 4: not valid YAML"),
    "empty": ("", ": <top level>: the file is empty"),
    "not_a_mapping": ("- a\n- b\n", ": <top level>: expected a mapping, got a list"),
    "duplicate_key": (OK + "methods: [trades]\n", ": line 5: not valid YAML: key 'methods' given twice"),
    "duplicate_seeds": (OK + "final: {seeds: [0, 1, 0]}\n", ": final.seeds: seed 0 is listed twice"),
    "budget_below_one_trial": (BASE + "methods: [pgd_at]\nsearch: {budget: {trial_epochs: 4}, epochs: 8}\n",
                               ": search.budget.trial_epochs: a budget of 4 trial-epochs is smaller than one trial"),
    "two_budgets": (BASE + "methods: [pgd_at]\nsearch: {budget: {trial_epochs: 4, device_hours: 1}, epochs: 2}\n",
                    ": search.budget: give exactly one of trial_epochs and device_hours"),
    "unknown_scheduler": (BASE + "methods: [pgd_at]\nsearch: {budget: {trial_epochs: 4}, epochs: 2, scheduler: pbt}\n",
                          ": search.scheduler: unknown value 'pbt'; accepted: asha, none"),
    "eps_not_a_number": (OK + "threat: {eps: abc}\n", ": threat.eps: 'abc' is not a number; accepted:"),
    "schedule_word": (OK + "final: {schedule: fast}\n", ": final.schedule: expected preset or a mapping"),
    "epochs_zero": (OK + "final: {schedule: {epochs: 0}}\n", ": final.schedule.epochs: 0 is out of range; accepted:"),
    "preset_of_another_dataset": ("dataset: cifar10\nstudent: resnet18\nmethods: [pgd_at]\n" + SEARCH
                                  + "train: {preset: quickstart}\n", ": train.preset: preset 'quickstart' is for digits"),
    # these two need the methods and the configurations (PyTorch imported; more in test_more_bad_files)
    "set_typo": (BASE + "methods: {peeraid: {set: {tua: 5}}}\n" + SEARCH,
                 ": methods.peeraid.set.tua: --set tua: peeraid has no hyperparameter 'tua'; it has:"),
    "offline_without_teacher": (BASE + "methods: [rslad]\n" + SEARCH,
                                ": methods.rslad: rslad needs the robust teacher, which the study does not give; accepted:"),
}
# name -> (arguments after the module, text the error must hold); "{dir}" is the case's folder
BAD_OPTIONS = {
    "unknown_option": (["ok.yaml", "--dry-run", "--bogus"], "error: unrecognized arguments: --bogus"),
    "no_study": (["--dry-run"], "error: the following arguments are required: study"),
    "missing_file": (["nothere.yaml", "--dry-run"], "error: nothere.yaml: the study file does not exist"),
    "a_folder": (["sub", "--dry-run"], "error: sub: is a folder"),
    "name_with_slash": (["ok.yaml", "--dry-run", "--name", "a/b"], "error: --name 'a/b' must be a plain folder name"),
    "empty_storage_path": (["ok.yaml", "--dry-run", "--storage-path", " "], "error: --storage-path is empty"),
}
IMPORT_CHECK = ("import sys; from raydistill.study.__main__ import main; code = main(sys.argv[1:]); "
                "print('imported:', sorted(m for m in ('ray', 'mlflow') if m in sys.modules)); sys.exit(code)")


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAYDISTILL_STORAGE", "MLFLOW_TRACKING_URI")}
    return {**env, "HOME": str(home), "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Every command line of this module, run at once: name -> (returncode, stdout, stderr, folder, before)."""
    procs = {}

    def start(name: str, argv: list[str], files: dict[str, str]) -> None:
        d = tmp_path_factory.mktemp(name)
        for rel, text in files.items():
            (d / rel).write_text(text)
        (d / "sub").mkdir()
        argv = [a.replace("{dir}", str(d)) for a in argv]
        before = sorted(p.name for p in d.iterdir())
        procs[name] = (subprocess.Popen(argv, cwd=d, env=_env(d), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), d, before)

    for name, (text, _) in BAD_FILES.items():
        start(name, [sys.executable, "-m", "raydistill.study", "study.yaml", "--dry-run", "--storage-path",
                     "{dir}/store", "--tracking-uri", "sqlite:///{dir}/mlflow.db"], {"study.yaml": text})
    for name, (args, _) in BAD_OPTIONS.items():
        start(name, [sys.executable, "-m", "raydistill.study", *args], {"ok.yaml": OK})
    # the shipped studies: quickstart by name (found beside the package), the CIFAR-10 one by path
    start("quickstart", [sys.executable, "-c", IMPORT_CHECK, "quickstart", "--dry-run", "--storage-path", "{dir}/store"], {})
    start("cifar10", [sys.executable, "-m", "raydistill.study", str(REPO / "studies" / "cifar10-resnet18.yaml"),
                      "--dry-run", "--storage-path", "{dir}/store", "--summary-json", "{dir}/s.json"], {})
    start("raydistill_command", [sys.executable, "-c", "from raydistill.cli import main; main()", "study", "ok.yaml",
                                 "--dry-run", "--name", ".hidden"], {"ok.yaml": OK})
    out = {}
    for name, (p, d, before) in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = (p.returncode, stdout, stderr, d, before)
    return out


def _one_error_line(result) -> str:
    code, stdout, stderr, d, before = result
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert sorted(p.name for p in d.iterdir()) == before, "the command created something"
    return lines[0]


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_study_file_is_one_error_line_naming_file_and_key(results, name):
    line = _one_error_line(results[name])
    assert line.startswith("error: study.yaml: ") and BAD_FILES[name][1] in line, line


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_bad_option_is_one_error_line(results, name):
    line = _one_error_line(results[name])
    assert BAD_OPTIONS[name][1] in line, line


def test_quickstart_is_found_by_name_and_dry_runs_without_ray_or_mlflow(results):
    code, stdout, stderr, d, before = results["quickstart"]
    assert code == 0, stderr
    assert "imported: []" in stdout
    for key in ("teacher/robust", "search/rslad", "final/peeraid/seed1", "eval/natural/seed0", "report"):
        assert f"  {key} " in stdout, key
    assert sorted(p.name for p in d.iterdir()) == before


def test_cifar10_study_dry_run_prints_stages_runs_budgets_hours(results):
    code, stdout, stderr, d, before = results["cifar10"]
    assert code == 0, stderr
    for text in ("stage 1/5 teachers", "stage 2/5 search: budget 160 trial-epochs per method", "stage 3/5 final: 39 runs",
                 "stage 4/5 evaluation: 39 runs: clean, fgsm, pgd20, cw, aa on the same first 10000 test images",
                 "teacher/robust", "trades on wrn34_10", "final/cat_aka/seed2", "eps 0.03137 (8/255)", "device-hours",
                 "the estimate assumes:", "--summary-json", "nothing was run or created",
                 # each run's schedule and the method's preset keys it got (issue 27: CAT-AKA's own 120 epochs)
                 "120 epochs, lr 0.01 x0.1 at 75,90,100, wd 0.0035 (preset cifar10 + cifar10/resnet18)",
                 "300 epochs, lr 0.1 x0.1 at 200,250,270, wd 0.0002 (preset cifar10)",
                 "120 epochs, lr 0.1 x0.1 at 100,110, wd 0.0005 (dataset defaults)"):
        assert text in stdout, text
    assert sorted(p.name for p in d.iterdir()) == before


def test_the_raydistill_command_runs_study(results):
    line = _one_error_line(results["raydistill_command"])
    assert "error: --name '.hidden' must be a plain folder name" in line


def test_resume_of_a_study_that_does_not_exist_creates_nothing(tmp_path, monkeypatch):
    from raydistill.errors import UsageError
    from raydistill.study.__main__ import main

    (tmp_path / "ok.yaml").write_text(OK)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UsageError, match="--resume: no study named 'ok' under .*store; give the --name and --storage-path"):
        main(["ok.yaml", "--resume", "--storage-path", str(tmp_path / "store")])
    assert [p.name for p in tmp_path.iterdir()] == ["ok.yaml"]


# ----------------------------------------------------------------------------- in-process
def _plan(tmp_path: Path, text: str, **kw):
    from raydistill.study import load_study

    p = tmp_path / "study.yaml"
    p.write_text(text)
    return load_study(str(p), **kw)


@pytest.mark.parametrize("text,needle", [
    (BASE + "methods: [pgd_at, pgdat]\n" + SEARCH, "methods[1]: unknown method 'pgdat'; accepted: natural,"),
    (BASE + "methods: [rslad]\nteachers: {robust: {checkpoint: nothere/model.pt}}\n" + SEARCH,
     "teachers.robust.checkpoint: '"),
    (OK + "evaluation: {attacks: [clean, pgd7]}\n", "evaluation.attacks[1]: unknown attack 'pgd7'"),
    (OK + "threat: {eps: 2}\n", "threat.eps: --eps 2.0 is above 1"),
    ("dataset: cifar11\nstudent: resnet18\nmethods: [pgd_at]\n" + SEARCH, "dataset: unknown dataset 'cifar11'"),
    (OK + "teachers: {robust: {method: pgd_at}}\n", "teachers.robust: no method of the study needs the robust teacher"),
    (BASE + "methods: [rslad]\nteachers: {robust: {method: rslad}}\n" + SEARCH,
     "teachers.robust.method: 'rslad' cannot train the robust teacher"),
    (OK + "evaluation: {n_examples: 5000}\n", "evaluation.n_examples: 5000 is more than the 449 test images of digits"),
    (BASE + "methods: [pgd_at]\nsearch: {budget: {device_hours: 0.00001}, epochs: 8}\n",
     "search.budget.device_hours: 1e-05 device-hours buy"),
    (OK + "train: {workers: 0}\n", "train.workers: 0 (in-process) cannot run the search"),
    (OK + "train: {workers: 4, batch_size: 2}\n", "train.batch_size: --batch-size 2 is smaller than --workers 4"),
    (BASE + "methods: {peeraid: {set: {tau: -1}}}\n" + SEARCH, "methods.peeraid.set.tau: --set tau=-1: tau of peeraid must be > 0"),
    (BASE + "methods: [akd2]\nteachers: {robust: {method: pgd_at}}\n" + SEARCH, "methods.akd2: akd2 needs the natural teacher"),
])
def test_more_bad_files(tmp_path, text, needle):
    from raydistill.errors import UsageError

    with pytest.raises(UsageError) as exc:
        _plan(tmp_path, text)
    assert str(exc.value).startswith(f"{tmp_path / 'study.yaml'}: ") and needle in str(exc.value), str(exc.value)


def test_plan_runs_and_their_configurations(tmp_path):
    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(b"")
    plan = _plan(tmp_path, BASE + "methods: {rslad: {set: {alpha: 0.5}}, peeraid: {}}\n"
                 "teachers: {robust: {method: pgd_at, schedule: {epochs: 3}}}\n"
                 "search: {budget: {device_hours: 0.01}, epochs: 2}\nfinal: {seeds: 2, schedule: {epochs: 4}}\n"
                 "estimate: {tflops: 0.05}\n", storage_path=str(tmp_path / "store"))
    assert [s.name for s in plan.stages] == ["teachers", "search", "final", "evaluation", "report"]
    assert [r.key for r in plan.runs()] == [
        "teacher/robust", "search/rslad", "search/peeraid", "final/rslad/seed0", "final/rslad/seed1",
        "final/peeraid/seed0", "final/peeraid/seed1", "eval/rslad/seed0", "eval/rslad/seed1", "eval/peeraid/seed0",
        "eval/peeraid/seed1", "report"]
    assert plan.run("teacher/robust").config.epochs == 3
    search = plan.run("search/rslad")
    assert search.needs == ("teacher/robust",) and search.config.epochs == 2 and search.config.hp["alpha"] == 0.5
    assert search.detail["trial_epochs"] >= 2 and search.device_hours > 0  # converted from device-hours
    final = plan.run("final/rslad/seed1")
    assert final.config.seed == 1 and final.config.epochs == 4 and final.config.teacher == "study://teacher/robust"
    assert final.needs == ("teacher/robust", "search/rslad")
    cfg = final.resolve({"teacher/robust": str(ckpt)}, trial={"alpha": 0.25})
    assert cfg.teacher == str(ckpt) and cfg.hp["alpha"] == 0.25 and cfg.seed == 1
    assert plan.run("eval/peeraid/seed0").detail["n_examples"] == 449
    assert plan.device_hours == pytest.approx(sum(r.device_hours for r in plan.runs()))


def test_cost_model_covers_every_method_and_dataset():
    from raydistill.data import DATASETS, load_dataset
    from raydistill.methods import METHODS
    from raydistill.study.cost import DATASET_SIZES, PASSES

    assert set(METHODS.names()) <= set(PASSES)
    assert set(DATASETS.names()) <= set(DATASET_SIZES)
    d = load_dataset("digits", val_size=0)
    assert DATASET_SIZES["digits"] == (len(d.train_y), len(d.test_y))


def test_gflops_table_is_the_flop_counters():
    from raydistill.study.cost import GFLOPS_32, counted_gflops, gflops_of

    assert counted_gflops("small_cnn", (3, 32, 32), 10) == pytest.approx(GFLOPS_32["small_cnn"], rel=0.01)
    assert gflops_of("resnet18", "digits") == pytest.approx(GFLOPS_32["resnet18"] / 16)


def test_shipped_studies_are_in_the_repository():
    tracked = subprocess.run(["git", "ls-files", "studies"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert {"studies/quickstart.yaml", "studies/cifar10-resnet18.yaml", "studies/fashion-mnist.yaml"} <= set(tracked)


def test_fashion_mnist_study_plans_the_five_methods_at_real_scale():
    """studies/fashion-mnist.yaml: the quickstart study's five methods on the full Fashion-MNIST, 3 seeds,
    AutoAttack on 1,000 test images; its dry run prints the device-hours and creates nothing."""
    p = subprocess.run([sys.executable, "-m", "raydistill.study", "studies/fashion-mnist.yaml", "--dry-run"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    total = next(line for line in p.stdout.splitlines() if line.startswith("total:"))
    assert re.match(r"total: 37 runs, \d+\.\d+ device-hours", total), total
    for run in ("teacher/robust", "final/rslad/seed2", "eval/peeraid/seed2"):
        assert run in p.stdout, run
    assert "trades_smallcnn" in p.stdout and "dry run: nothing was run or created" in p.stdout
