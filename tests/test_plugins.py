"""Plugins (raydistill.plugins, plugin_checks, provenance): a user's own method, model and dataset, loaded from a
.py file, a module, RAYDISTILL_PLUGINS or an installed package's entry points; each bad plugin one error line
with nothing created; the digest that refuses a resume with changed code. On Ray and a cluster:
tests/test_cluster_plugins.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_one_error_line, cli

PLUGINS = REPO / "tests" / "plugins"
BUILT_IN = ["natural", "pgd_at", "trades", "ard", "rslad", "akd2", "iad1", "iad2", "adaad", "adaiad", "peeraid",
            "at_aka", "cat_aka"]
METHOD = """from raydistill.extend import Method, WEIGHT, attacks, losses
class {cls}(Method):
    name = "{name}"
    hparams = {{"beta": 1.0}}
    ranges = {{"beta": WEIGHT}}
    def outer_min(self, nets, x, y, adv, ctx):
        return {{"ce": ctx.hp.beta * losses.ce(nets.student(x), y)}}
"""


@pytest.fixture(autouse=True)
def forget_plugins():
    """Plugins a test loads in this process are forgotten after it (their names leave the registries)."""
    from raydistill import plugins

    before = dict(plugins.LOADED)
    yield
    for key, p in list(plugins.LOADED.items()):
        if key not in before:
            del plugins.LOADED[key]
            plugins._unload(p)


def fake_package(site: Path, dist: str, module: str, entry_points: str, code: str, version: str = "0.3.0") -> None:
    """An installed distribution as pip leaves it (its module, METADATA, entry_points.txt, top_level.txt)."""
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(code)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)
    (info / "top_level.txt").write_text(module + "\n")


def test_list_shows_every_method_with_its_origin(tmp_path):
    """A file (--plugin), a module (RAYDISTILL_PLUGINS) and an installed package's entry points, side by side with
    the built-ins: the first column stays the plain name."""
    site = tmp_path / "site"
    fake_package(site, "rd-fake", "rd_fake", "[raydistill.methods]\nclean4 = rd_fake:Clean4\n",
                 METHOD.format(cls="Clean4", name="clean4"))
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "modmeth.py").write_text(METHOD.format(cls="ModMeth", name="modmeth"))
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(site), str(tmp_path / "mods")]), "RAYDISTILL_PLUGINS": "modmeth"}
    proc = cli("train", "--list", "--plugin", str(PLUGINS / "ce_plus.py"), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert list(rows)[:13] == BUILT_IN and all(rows[m] == "built-in" for m in BUILT_IN)
    assert rows["clean4"].startswith("plugin: rd-fake==0.3.0 (entry point raydistill.methods:clean4) (sha256 ")
    assert rows["modmeth"].startswith(f"plugin: module modmeth at {tmp_path / 'mods' / 'modmeth.py'} (sha256 ")
    assert rows["ce_plus"].startswith(f"plugin: {PLUGINS / 'ce_plus.py'} (sha256 ")
    assert len(rows) == 16


def test_a_plugins_names_work_where_the_built_ins_do(tmp_path):
    """Through the one configuration path, with its declared search space, the checks on 2 images passing."""
    from raydistill import plugins, search_space
    from raydistill.config import resolve
    from raydistill.plugin_checks import check_config
    from raydistill.provenance import used_by

    p = plugins.use([str(PLUGINS / "ce_plus.py")])[0]
    assert plugins.use([str(PLUGINS / "ce_plus.py")])[0] is p  # imported once
    assert p.provides() == {"method": ["ce_plus"], "model": ["tiny_mlp"]}
    cfg = resolve("ce_plus", {"dataset": "digits", "student": "tiny_mlp"}, {"beta": "0.25"})
    assert cfg.hp["beta"] == 0.25
    check_config(cfg)
    assert search_space.load("ce_plus").path == PLUGINS / "ce_plus.yaml"
    rec = used_by(cfg)["ce_plus"]
    assert rec["digest"] == p.digest and rec["provides"]["model"] == ["tiny_mlp"] and rec["source"] == str(PLUGINS / "ce_plus.py")
    from raydistill.errors import UsageError

    with pytest.raises(UsageError, match=r"model 'tiny_mlp' accepts inputs of 8x8, not 32x32"):
        check_config(resolve("ce_plus", {"dataset": "synthetic", "student": "tiny_mlp"}))


# ----------------------------------------------------------------------------- bad plugins and inputs
GOOD = METHOD.format(cls="Good", name="{name}")
BAD = {  # name -> (files: {file: text}, extra arguments, what the error line says)
    "import_error": ({"p_import.py": "import torch\n\nx = foo + 1\n"}, [],
                     ["plugin {d}/p_import.py failed to import: NameError: name 'foo' is not defined (p_import.py line 3)"]),
    "syntax_error": ({"p_syntax.py": "def f(:\n    pass\n"}, [], ["failed to import: SyntaxError: ", "(p_syntax.py line 1)"]),
    "collides_with_a_built_in": ({"p_trades.py": METHOD.format(cls="T", name="trades")}, [],
                                 ["plugin {d}/p_trades.py: method 'trades' is already a built-in; give yours another name"]),
    "collides_with_another_plugin": ({"p_one.py": METHOD.format(cls="A", name="twice"), "p_two.py":
                                      METHOD.format(cls="B", name="twice")}, ["--plugin", "{d}/p_two.py"],
                                     ["plugin {d}/p_two.py: method 'twice' is already from {d}/p_one.py"]),
    "no_outer_min": ({"p_noouter.py": "from raydistill.extend import Method\nclass M(Method):\n    name = 'noouter'\n"}, [],
                     ["method 'noouter' has no outer_min"]),
    "range_missing": ({"p_norange.py": METHOD.replace("    ranges = {{\"beta\": WEIGHT}}\n", "").format(cls="M", name="norange")},
                      [], ["method 'norange' has no range for its numeric hyperparameter 'beta' (default 1.0)"]),
    "space_names_an_unknown_hyperparameter": (
        {"p_space.py": METHOD.format(cls="M", name="spacey").replace("    ranges", "    search_space = 'p_space.yaml'\n    ranges"),
         "p_space.yaml": "method: spacey\nparams:\n  gamma: {float: [0.1, 1.0]}\n"}, [],
        ["method 'spacey': search space '{d}/p_space.yaml': gamma: spacey has no hyperparameter 'gamma'"]),
    "model_fails_on_the_datasets_shape": (
        {"p_model.py": "from torch import nn\nfrom raydistill.extend import register_model\n"
                       "register_model('wide_mlp', lambda n, c: nn.Sequential(nn.Flatten(), nn.Linear(c * 32 * 32, n)))\n"},
        ["--student", "wide_mlp"], ["plugin {d}/p_model.py: model 'wide_mlp' fails on digits's inputs (1, 8, 8) with 10 "
                                    "classes: RuntimeError: mat1 and mat2 shapes cannot be multiplied"]),
    "loss_not_finite": ({"p_nan.py": METHOD.format(cls="M", name="nanloss").replace("ctx.hp.beta *", "float('nan') *")},
                        [], ["method 'nanloss': loss term 'ce' is nan on a batch of 2 digits images (1, 8, 8), not a finite number"]),
    "loss_not_a_scalar": ({"p_vec.py": METHOD.format(cls="M", name="vecloss").replace(
        "losses.ce(nets.student(x), y)", "nets.student(x).sum(1)")}, [],
        ["method 'vecloss': loss term 'ce' is a tensor of shape (2,) on a batch of 2 digits images (1, 8, 8), not a scalar"]),
    "registers_nothing": ({"p_empty.py": "X = 1\n"}, [], ["plugin {d}/p_empty.py registers no method, model or dataset"]),
    "upper_case_name": ({"p_upper.py": METHOD.format(cls="M", name="MyMethod")}, [],
                        ["method name 'MyMethod' must be lower case"]),
    "text_hyperparameter_without_choices": (
        {"p_text.py": METHOD.format(cls="M", name="texty").replace('{"beta": 1.0}', '{"beta": 1.0, "mode": "a"}')}, [],
        ["method 'texty' has no choices for its text hyperparameter 'mode'"]),
    "bad_dataset": ({"p_data.py": "from raydistill.extend import register_dataset\n"
                                  "@register_dataset('tiny_set', 1, (1, 8, 8))\ndef load(data_dir, download):\n    pass\n"},
                    [], ["plugin {d}/p_data.py: dataset 'tiny_set' has num_classes 1: give an integer >= 2"]),
    "missing_file": ({}, [], ["plugin {d}/p_missing.py: file '{d}/p_missing.py' does not exist"]),
    "no_such_module": ({}, [], ["plugin nosuchmodule_xyz: no module named 'nosuchmodule_xyz'"]),
}
FIRST = {"missing_file": "{d}/p_missing.py", "no_such_module": "nosuchmodule_xyz",
         "collides_with_another_plugin": "{d}/p_one.py"}
METHOD_OF = {"collides_with_another_plugin": "twice", "no_outer_min": "noouter", "range_missing": "norange",
             "space_names_an_unknown_hyperparameter": "spacey", "loss_not_finite": "nanloss", "loss_not_a_scalar": "vecloss",
             "upper_case_name": "MyMethod", "text_hyperparameter_without_choices": "texty"}  # else pgd_at


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_plugin_is_one_error_line_and_nothing_is_created(case, tmp_path, capsys):
    from raydistill.train import run

    files, extra, needles = BAD[case]
    d = tmp_path / case
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    first = FIRST.get(case, str(d / next(iter(files), "")))
    method = METHOD_OF.get(case, "pgd_at")
    argv = [method, "--plugin", first.format(d=d), *[a.format(d=d) for a in extra], "--dataset", "digits",
            "--workers", "0", "--epochs", "1", "--storage-path", str(tmp_path / "runs"),
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--name", "bad"]
    with pytest.raises(SystemExit) as exit_:
        run(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n.format(d=d) in err[0], (n.format(d=d), err[0])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_broken_installed_package_is_one_line_naming_it(tmp_path):
    site = tmp_path / "site"
    fake_package(site, "rd-broken", "rd_broken", "[raydistill.methods]\nbroken = rd_broken:Broken\n",
                 "import numpy\n\nraise ImportError('needs libfoo')\n", version="1.2")
    proc = cli("train", "pgd_at", "--workers", "0", "--storage-path", str(tmp_path / "runs"), "--tracking-uri",
               f"sqlite:///{tmp_path}/mlflow.db", env={"PYTHONPATH": f"{REPO}{os.pathsep}{site}"}, timeout=300)
    assert_one_error_line(proc, "plugin rd-broken==1.2 (entry point raydistill.methods:broken) failed to import: "
                                "ImportError: needs libfoo (__init__.py line 3)")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_study_relaunched_with_a_changed_plugin_is_refused(tmp_path):
    """A study's folder records its plugins' digests: --resume with other code is one line, nothing run."""
    for f in ("ce_plus.py", "ce_plus.yaml"):
        shutil.copy(PLUGINS / f, tmp_path / f)
    study = tmp_path / "s.yaml"
    study.write_text("study: plugstudy\nplugins: [ce_plus.py]\ndataset: digits\nstudent: tiny_mlp\n"
                     "methods: [pgd_at, ce_plus]\nsearch: {budget: {trial_epochs: 2}, epochs: 1}\n")
    folder = tmp_path / "runs" / "plugstudy"
    folder.mkdir(parents=True)
    (folder / "study.yaml").write_text(study.read_text())
    (folder / "plugins.json").write_text(json.dumps({"plugins": {"ce_plus": {"digest": "sha256:0123", "source": "old"}}}))
    proc = cli("study", str(study), "--resume", "--storage-path", str(tmp_path / "runs"),
               "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", timeout=300)
    assert_one_error_line(proc, "study 'plugstudy' was started with plugin ce_plus sha256:0123 (old); it is now sha256:",
                          "--allow-changed-plugin")
    assert not (tmp_path / "mlflow.db").exists() and sorted(os.listdir(folder)) == ["plugins.json", "study.yaml"]


def test_a_search_resumed_with_a_changed_plugin_is_refused(tmp_path):
    """tune --resume: the search's folder (Tune's state, here its marker file) records other plugin code."""
    folder = tmp_path / "runs" / "js"
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    (folder / "plugins.json").write_text(json.dumps({"plugins": {"ce_plus": {"digest": "sha256:0123", "source": "old"}}}))
    proc = cli("tune", "ce_plus", "--plugin", str(PLUGINS / "ce_plus.py"), "--student", "tiny_mlp", "--resume",
               "--name", "js", "--storage-path", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
               timeout=300)
    assert_one_error_line(proc, "search 'js' was started with plugin ce_plus sha256:0123 (old); it is now sha256:",
                          "--allow-changed-plugin")
    assert not (tmp_path / "mlflow.db").exists() and sorted(os.listdir(folder)) == ["plugins.json", "tuner.pkl"]


# ----------------------------------------------------------------------------- provenance of a run
@pytest.mark.slow  # it trains (in-process, 3 epochs of a tiny MLP on digits) and evaluates twice
def test_a_resumed_run_with_a_changed_plugin_is_refused_unless_allowed(tmp_path, capsys):
    """In-process runs (--workers 0): the digest in MLflow, the summary and the checkpoint; the relaunch with a
    changed file refused in one line; with --allow-changed-plugin it resumes and the change is recorded."""
    from mlflow.tracking import MlflowClient

    from raydistill.checkpoint import safe_load
    from raydistill.train import run

    plugin = tmp_path / "ce_resumed.py"
    plugin.write_text((PLUGINS / "ce_plus.py").read_text().replace('"ce_plus"', '"ce_resumed"')
                      .replace('search_space = "ce_plus.yaml"', "").replace('"tiny_mlp"', '"tiny_mlp2"'))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["ce_resumed", "--plugin", str(plugin), "--dataset", "digits", "--student", "tiny_mlp2", "--workers", "0",
            "--attack-steps", "1", "--batch-size", "256", "--test-attacks", "clean", "--val-size", "100",
            "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri, "--name", "r"]
    with pytest.raises(SystemExit) as e:
        run([*args, "--epochs", "1", "--summary-json", str(tmp_path / "a.json")])
    assert e.value.code == 0
    a = json.loads((tmp_path / "a.json").read_text())
    old = a["plugins"]["ce_resumed"]["digest"]
    assert old.startswith("sha256:") and a["plugins"]["ce_resumed"]["provides"] == {"method": ["ce_resumed"],
                                                                                    "model": ["tiny_mlp2"]}
    assert MlflowClient(uri).get_run(a["mlflow_run_id"]).data.tags["plugin.ce_resumed"] == old
    assert safe_load(a["checkpoint"])["meta"]["plugins"]["ce_resumed"]["digest"] == old

    plugin.write_text(plugin.read_text() + "# changed\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the same process: the plugin module is loaded again as a new one
        _fresh_run(run, plugin, [*args, "--epochs", "2"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1, err
    assert f"error: run 'r' was started with plugin ce_resumed {old}" in err[0] and "--allow-changed-plugin" in err[0]

    with pytest.raises(SystemExit) as e:
        _fresh_run(run, plugin, [*args, "--epochs", "2", "--allow-changed-plugin", "--summary-json", str(tmp_path / "b.json")])
    assert e.value.code == 0
    b = json.loads((tmp_path / "b.json").read_text())
    new = b["plugins"]["ce_resumed"]["digest"]
    assert b["epochs_completed"] == 2 and b["mlflow_run_id"] == a["mlflow_run_id"] and new != old
    tags = MlflowClient(uri).get_run(b["mlflow_run_id"]).data.tags
    assert tags["plugin.ce_resumed"] == new and tags["plugin.ce_resumed.changed"] == f"{old} -> {new}"
    history = json.loads((tmp_path / "runs" / "r" / "plugins.json").read_text())["history"]
    assert history[0]["changed"] == {"ce_resumed": {"old": old, "new": new}}

    # evaluate: the checkpoint names the plugin its model needs (a fresh process, without it), and runs with it
    ev = cli("evaluate", b["checkpoint"], "--attacks", "clean", "--n-examples", "20", "--storage-path",
             str(tmp_path / "ev"), timeout=300)
    assert_one_error_line(ev, f"holds a model 'tiny_mlp2' of plugin ce_resumed ({plugin}, {new}), which is not "
                              "loaded: give --plugin")
    ev = cli("evaluate", b["checkpoint"], "--attacks", "clean", "--n-examples", "20", "--plugin", str(plugin),
             "--storage-path", str(tmp_path / "ev"), "--summary-json", str(tmp_path / "e.json"), "-q", timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((tmp_path / "e.json").read_text())["plugins"]["ce_resumed"]["digest"] == new


def _fresh_run(run, plugin: Path, argv: list[str]) -> None:
    """``run(argv)`` after forgetting ``plugin`` (a relaunch is a new process: it loads the file as it is now)."""
    from raydistill import plugins

    loaded = plugins.LOADED.pop(str(plugin.resolve()), None)
    if loaded is not None:
        plugins._unload(loaded)
    run(argv)


def test_the_study_table_names_a_plugins_row_and_flags_two_versions():
    from types import SimpleNamespace

    from raydistill.study import table

    records = [{"plugins": {"mart": {"source": "/x/mart.py", "digest": d}}} for d in ("sha256:aa", "sha256:aa")]
    assert table.code_of(records) == {"mart": {"source": "/x/mart.py", "digests": ["sha256:aa"]}}
    records[1]["plugins"]["mart"]["digest"] = "sha256:bb"
    assert table.code_of(records)["mart"]["digests"] == ["sha256:aa", "sha256:bb"]
    spec = SimpleNamespace(dataset="digits", student="small_cnn", final=SimpleNamespace(seeds=(0, 1)), teachers={})
    row = {"mean": {"clean_acc": 0.9}, "std": {"clean_acc": 0.01}, "n": 2, "final": [],
           "search": {"trials": 2, "trial_epochs": 2, "budget_trial_epochs": 2}, "plugins": table.code_of(records)}
    from raydistill.config import resolve

    cfg = resolve("pgd_at", {"dataset": "digits", "student": "small_cnn"})  # the planned final run's setting
    plan = SimpleNamespace(name="s", spec=spec, runs=lambda: [], run=lambda key: SimpleNamespace(config=cfg))
    text = table.markdown(plan, {"mart": row}, {}, 100)
    assert "**mart's final runs span 2 versions of plugin mart** (sha256:aa, sha256:bb)" in text


def test_bench_times_a_plugin_method(tmp_path):
    path = tmp_path / "bench.json"
    proc = cli("bench", "--methods", "ce_plus", "--plugin", str(PLUGINS / "ce_plus.py"), "--student", "tiny_mlp",
               "--dataset", "synthetic", "--image-size", "8", "--batch-size", "16", "--steps", "2", "--warmup", "1",
               "--attack-steps", "2", "--eval-examples", "16", "--threads", "1", "--summary-json", str(path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads(path.read_text())["results"]
    assert r["method"] == "ce_plus" and r["images_per_s"] > 0 and r["passes"] == {"student": {"forward": 4, "backward": 4}}
    assert r["plugins"]["ce_plus"]["digest"].startswith("sha256:")


def test_extend_is_the_public_api():
    import raydistill.extend as ext

    for name in ("Method", "OfflineMethod", "NetSpec", "Nets", "StepContext", "HP", "attack_hparams", "Range", "WEIGHT",
                 "POSITIVE", "FRACTION", "register_model", "register_dataset", "MODELS", "DATASETS", "Splits",
                 "attacks", "losses", "ENTRY_POINT_GROUPS"):
        assert name in ext.__all__ and hasattr(ext, name), name
    assert ext.ENTRY_POINT_GROUPS == ("raydistill.methods", "raydistill.models", "raydistill.datasets")
    assert subprocess.run([sys.executable, "-c", "import raydistill.extend"], cwd=str(REPO)).returncode == 0
