"""Data without code (issue 28, item 5): ``--dataset folder:PATH`` and ``--dataset npz:PATH``.

Real files made here: PNG / JPEG folders written with PIL, .npz files with numpy.savez. The name resolves
through the datasets' registry (raydistill.userdata); shapes, classes and splits are read from the data;
every bad folder or array is one ``error:`` line, exit 2, before anything is created; a run trains on it in
process and ``evaluate CHECKPOINT`` reloads it from the name the checkpoint records.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raydistill.data import DATASETS, load_dataset
from raydistill.errors import UsageError
from raydistill.userdata import canonical, label

pytestmark = pytest.mark.usefixtures("one_thread")


def write_images(folder: Path, counts: dict[str, int], size=(8, 8), mode: str = "RGB", suffix: str = ".png",
                 seed: int = 0) -> None:
    """``counts[cls]`` images per class folder: each class its own brightness, plus noise (learnable)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    for k, (cls, n) in enumerate(counts.items()):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            level = 40 + 170 * k / max(1, len(counts) - 1)
            a = np.clip(level + rng.normal(0, 20, (size[1], size[0], channels)), 0, 255).astype(np.uint8)
            Image.fromarray(a[..., 0] if channels == 1 else a, mode).save(folder / cls / f"{i:03d}{suffix}")


def spec_error(name: str) -> str:
    with pytest.raises(UsageError) as exc:
        DATASETS.get(name)
    return str(exc.value)


# ============================================================================= what is read from the data
def test_a_class_folder_layout_gives_shape_classes_and_a_fixed_stratified_test_split(tmp_path):
    write_images(tmp_path / "pets", {"dog": 10, "cat": 10, "eel": 20}, size=(12, 10))
    (tmp_path / "pets" / "cat" / "notes.txt").write_text("not an image: ignored")
    (tmp_path / "pets" / ".cache").mkdir()  # hidden: ignored
    name = f"folder:{tmp_path / 'pets'}"
    spec = DATASETS.get(name)
    assert (spec.num_classes, spec.in_shape, spec.sizes) == (3, (3, 10, 12), (32, 8))
    assert spec.defaults == {"eps": 8 / 255, "step_size": 2 / 255}
    d = load_dataset(name, val_size=3)
    assert d.classes == ("cat", "dog", "eel")  # sorted folder names, as ImageFolder numbers them
    assert d.train_x.dtype == torch.uint8 and tuple(d.train_x.shape[1:]) == (3, 10, 12)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (29, 3, 8)
    assert torch.bincount(d.test_y).tolist() == [2, 2, 4]  # 20%, stratified
    again = load_dataset(name, val_size=3)
    assert torch.equal(again.test_x, d.test_x)  # the same split every time (its seed is fixed)
    assert (d.crop_pad, d.hflip) == (1, False)
    # a cat image is the cat folder's file, decoded
    cat = np.array(Image.open(sorted((tmp_path / "pets" / "cat").glob("*.png"))[0]))
    assert any(torch.equal(torch.from_numpy(cat).permute(2, 0, 1), x) for x in torch.cat([d.train_x, d.val_x, d.test_x]))


def test_train_and_test_folders_grayscale_jpeg_and_options(tmp_path):
    write_images(tmp_path / "d" / "train", {"a": 6, "b": 6}, mode="L", suffix=".jpg")
    write_images(tmp_path / "d" / "test", {"a": 2, "b": 3}, mode="L", suffix=".JPEG", seed=1)
    d = load_dataset(f"folder:{tmp_path / 'd'}?hflip=true", val_size=2)
    assert (d.in_shape, d.classes, d.hflip, len(d.test_y), d.test_y.tolist()) == ((1, 8, 8), ("a", "b"), True, 5,
                                                                                    [0, 0, 1, 1, 1])
    # one colour image among grayscale ones: all are read as RGB
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d" / "train" / "a" / "rgb.png")
    assert DATASETS.get(f"folder:{tmp_path / 'd'}").in_shape == (3, 8, 8)


def test_npz_layouts_dtypes_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(40) % 4
    np.savez(tmp_path / "nhwc.npz", x=rng.integers(0, 256, (40, 6, 5, 3), dtype=np.uint8), y=y)
    np.savez(tmp_path / "nchw.npz", x=rng.random((40, 1, 6, 5), dtype=np.float32), y=y,
             x_test=rng.random((7, 1, 6, 5), dtype=np.float32), y_test=np.arange(7) % 4,
             classes=np.array(["w", "x", "y", "z"]))
    np.savez(tmp_path / "nhw.npz", x=rng.random((40, 6, 5)), y=y)
    a = load_dataset(f"npz:{tmp_path / 'nhwc.npz'}", val_size=4)
    assert (a.in_shape, a.train_x.dtype, len(a.test_y), a.classes) == ((3, 6, 5), torch.uint8, 8, ("0", "1", "2", "3"))
    b = load_dataset(f"npz:{tmp_path / 'nchw.npz'}", val_size=4)
    assert (b.in_shape, b.train_x.dtype, b.test_y.tolist(), b.classes) == ((1, 6, 5), torch.float32, [0, 1, 2, 3, 0, 1, 2],
                                                                           ("w", "x", "y", "z"))
    c = load_dataset(f"npz:{tmp_path / 'nhw.npz'}?test_fraction=0.5", val_size=4)
    assert (c.in_shape, len(c.test_y)) == ((1, 6, 5), 20)
    # NHWC is transposed, not reshaped: pixel (i, row, col, channel) stays where it was
    x = np.load(tmp_path / "nhwc.npz")["x"]
    whole = load_dataset(f"npz:{tmp_path / 'nhwc.npz'}?test_fraction=0.5", val_size=0)
    first = torch.cat([whole.train_x, whole.test_x])
    assert any(torch.equal(torch.from_numpy(x[0]).permute(2, 0, 1), img) for img in first)


def test_names_are_made_absolute_and_short_labels_name_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert canonical("folder:pets") == f"folder:{tmp_path / 'pets'}"
    assert canonical("npz:a/x.npz?test_fraction=0.30,hflip=true") == f"npz:{tmp_path / 'a/x.npz'}?hflip=true,test_fraction=0.3"
    assert canonical("folder:s3://bucket/pets/") == "folder:s3://bucket/pets"
    assert canonical("digits") == "digits"
    assert [label(n) for n in ("folder:/d/my pets", "npz:s3://b/x.npz", "cifar10")] == ["my_pets", "x", "cifar10"]


# ============================================================================= bad data: one line each
def make_bad_folders(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (dataset name, what its error line must say)."""
    t = tmp_path
    (t / "empty").mkdir(parents=True)
    write_images(t / "one", {"only": 4})
    write_images(t / "noimg", {"a": 4})
    (t / "noimg" / "b").mkdir()
    (t / "noimg" / "b" / "readme.txt").write_text("x")
    write_images(t / "broken", {"a": 4, "b": 4})
    (t / "broken" / "b" / "002.png").write_bytes(b"not a png at all")
    write_images(t / "mixed", {"a": 4, "b": 4})
    write_images(t / "mixed", {"b": 1}, size=(9, 8))  # overwrites b/000.png at 9x8
    write_images(t / "halfsplit" / "train", {"a": 4, "b": 4})
    write_images(t / "diffsplit" / "train", {"a": 4, "b": 4})
    write_images(t / "diffsplit" / "test", {"a": 2, "c": 2})
    write_images(t / "loose", {"a": 4, "b": 4})
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(t / "loose" / "stray.png")
    write_images(t / "few", {"a": 1, "b": 4})
    (t / "afile").write_text("x")
    return {
        "missing path": (f"folder:{t / 'nowhere'}", "no such folder"),
        "a file": (f"folder:{t / 'afile'}", "is a file, not a folder"),
        "empty folder": (f"folder:{t / 'empty'}", "has no class folders"),
        "one class only": (f"folder:{t / 'one'}", "one class only ('only')"),
        "empty class folder": (f"folder:{t / 'noimg'}", f"class folder {t / 'noimg' / 'b'} holds no images"),
        "unreadable image": (f"folder:{t / 'broken'}", "cannot read image b/002.png"),
        "mixed sizes": (f"folder:{t / 'mixed'}", "image b/000.png is 9x8 but a/000.png is 8x8"),
        "train/ without test/": (f"folder:{t / 'halfsplit'}", "has one of train/ and test/ but not the other"),
        "train/, test/ differ": (f"folder:{t / 'diffsplit'}", "test/ has the class folders a, c but train/ has a, b"),
        "images outside classes": (f"folder:{t / 'loose'}", "holds images outside the class folders (stray.png)"),
        "too few to hold out": (f"folder:{t / 'few'}", "cannot hold out 1 samples stratified by class"),
        "unknown option": (f"folder:{t / 'one'}?flip=1", "unknown option 'flip=1'; accepted: test_fraction="),
        "bad test_fraction": (f"folder:{t / 'one'}?test_fraction=1.5", "test_fraction=1.5 must be a number between 0 and 1"),
        "no path": ("folder:", "names no path; e.g. folder:data/pets or folder:s3://bucket/pets"),
    }


def make_bad_arrays(tmp_path: Path) -> dict[str, tuple[str, str]]:
    t, x, y = tmp_path, np.zeros((20, 8, 8), np.uint8), np.arange(20) % 2
    t.mkdir(parents=True)
    bad = {
        "names": dict(images=x, labels=y),
        "nox": dict(y=y),
        "halftest": dict(x=x, y=y, x_test=x),
        "dims": dict(x=np.zeros((20, 64), np.uint8), y=y),
        "channels": dict(x=np.zeros((20, 8, 8, 5), np.uint8), y=y),
        "range": dict(x=x, y=y, classes=np.array(["a", "b"]), y_test=np.full(20, 2), x_test=x),
        "negative": dict(x=x, y=y - 1),
        "oneclass": dict(x=x, y=np.zeros(20, np.int64)),
        "gap": dict(x=x, y=(np.arange(20) % 2) * 2),
        "float": dict(x=np.full((20, 8, 8), 2.0, np.float32), y=y),
        "nan": dict(x=np.full((20, 8, 8), np.nan, np.float32), y=y),
        "int": dict(x=x.astype(np.int64), y=y),
        "ylen": dict(x=x, y=y[:5]),
        "yfloat": dict(x=x, y=y.astype(np.float32)),
        "testshape": dict(x=x, y=y, x_test=np.zeros((20, 9, 8), np.uint8), y_test=y),
        "withtest": dict(x=x, y=y, x_test=x, y_test=y),
    }
    for stem, arrays in bad.items():
        np.savez(t / f"{stem}.npz", **arrays)
    (t / "text.npz").write_text("not a zip")
    return {
        "missing file": (f"npz:{t / 'nowhere.npz'}", "no such file"),
        "a folder": (f"npz:{t}", "is a folder, not an .npz file"),
        "not an npz": (f"npz:{t / 'text.npz'}", "is not a readable .npz file"),
        "wrong array names": (f"npz:{t / 'names.npz'}", "holds array 'images'; accepted arrays: x, y (required)"),
        "no x": (f"npz:{t / 'nox.npz'}", "has no array 'x' (it has y)"),
        "x_test without y_test": (f"npz:{t / 'halftest.npz'}", "has one of x_test and y_test but not the other"),
        "wrong dims": (f"npz:{t / 'dims.npz'}", "x has shape (20, 64); images are (N, H, W), (N, H, W, C) or (N, C, H, W)"),
        "5 channels": (f"npz:{t / 'channels.npz'}", "x has shape (20, 8, 8, 5)"),
        "label out of range": (f"npz:{t / 'range.npz'}", "y_test holds label 2, out of range: labels are 0..1 (the 2 names"),
        "negative label": (f"npz:{t / 'negative.npz'}", "y holds label -1, out of range"),
        "one class only": (f"npz:{t / 'oneclass.npz'}", "one class only"),
        "a class with no sample": (f"npz:{t / 'gap.npz'}", "class 1 has no sample in y"),
        "float above 1": (f"npz:{t / 'float.npz'}", "x holds values from 2 to 2; float images are in [0, 1]"),
        "NaN": (f"npz:{t / 'nan.npz'}", "x holds NaN or infinite values"),
        "int64 pixels": (f"npz:{t / 'int.npz'}", "x is int64; images are uint8 (0..255) or float (0..1)"),
        "labels not one per image": (f"npz:{t / 'ylen.npz'}", "labels are integers, one per image (20)"),
        "float labels": (f"npz:{t / 'yfloat.npz'}", "y is float32 of shape (20,)"),
        "test images of another shape": (f"npz:{t / 'testshape.npz'}", "x_test's images are (9, 8), x's are (8, 8)"),
        "test_fraction with a test split": (f"npz:{t / 'withtest.npz'}?test_fraction=0.1", "test_fraction applies only"),
    }


def test_every_bad_folder_and_array_is_one_line_naming_it(tmp_path):
    cases = {**make_bad_folders(tmp_path / "f"), **{f"npz {k}": v for k, v in make_bad_arrays(tmp_path / "n").items()}}
    for what, (name, needle) in cases.items():
        message = spec_error(name)
        assert "\n" not in message and needle in message, (what, message)
        shown = canonical(name) if "?" not in name and what != "no path" else name  # as given where it is unparsable
        assert message.startswith(f"dataset {shown}"), (what, message)
    assert "folder:PATH, npz:PATH" in spec_error("cifar7")  # the families are among the choices


def test_bad_data_stops_train_and_evaluate_with_one_error_line_and_creates_nothing(tmp_path, capsys):
    """The commands' own path: exit 2, one line, no run folder, no MLflow store (checked before anything)."""
    from raydistill.errors import cli_entry
    from raydistill.evaluate import main as evaluate
    from raydistill.train import main

    train = cli_entry(main)  # as python -m raydistill.train runs it
    bad = {**make_bad_folders(tmp_path / "f"), **make_bad_arrays(tmp_path / "n")}
    store, runs = tmp_path / "mlflow.db", tmp_path / "runs"
    for what in ("mixed sizes", "one class only", "unreadable image", "label out of range", "wrong array names"):
        name, needle = bad[what]
        with pytest.raises(SystemExit) as exit_:
            train(["pgd_at", "--dataset", name, "--workers", "0", "--storage-path", str(runs),
                   "--tracking-uri", f"sqlite:///{store}"])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: dataset "), (what, lines)
        assert needle in lines[0], (what, lines)
    write_images(tmp_path / "ok", {"a": 5, "b": 5})
    with pytest.raises(SystemExit) as exit_:  # --data-dir does not apply to a dataset that names its location
        train(["pgd_at", "--dataset", f"folder:{tmp_path / 'ok'}", "--data-dir", str(tmp_path), "--workers", "0"])
    assert exit_.value.code == 2 and "--data-dir is for the named datasets" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        evaluate(["nowhere.pt", "--dataset", bad["mixed sizes"][0], "--arch", "small_cnn", "--num-classes", "2"])
    assert exit_.value.code == 2 and "is 9x8 but" in capsys.readouterr().err
    assert not runs.exists() and not store.exists()


# ============================================================================= end to end
def test_train_and_evaluate_a_folder_dataset_in_process(tmp_path, monkeypatch, capsys):
    """``train --dataset folder:pets`` (a relative path, PNG and JPEG) in process and without MLflow, then
    ``evaluate CHECKPOINT`` from another folder: it reloads the data from the absolute name recorded."""
    from raydistill import checkpoint
    from raydistill.errors import cli_entry
    from raydistill.evaluate import main as evaluate
    from raydistill.train import main

    train = cli_entry(main)  # as python -m raydistill.train runs it

    write_images(tmp_path / "pets", {"cat": 15, "dog": 15})
    write_images(tmp_path / "pets", {"owl": 15}, suffix=".jpg")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        train(["pgd_at", "--dataset", "folder:pets", "--student", "small_cnn", "--epochs", "1", "--batch-size", "16",
               "--workers", "0", "--tracking-uri", "none", "--val-size", "3", "--attack-steps", "2",
               "--test-attacks", "clean", "--storage-path", "runs", "--summary-json", "s.json"])
    assert exit_.value.code == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["dataset"] == f"folder:{tmp_path / 'pets'}" and Path(s["checkpoint"]).parent.name.startswith("pgd_at-pets-")
    model = checkpoint.safe_load(f"{s['checkpoint']}/{checkpoint.MODEL_FILE}")
    assert (model["in_shape"], model["num_classes"], tuple(model["meta"]["classes"])) == ([3, 8, 8], 3, ("cat", "dog", "owl"))
    assert (model["meta"]["eps"], model["meta"]["step_size"]) == (8 / 255, 2 / 255)  # the dataset layer's defaults
    os.chdir(tmp_path.parent)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        evaluate([s["checkpoint"], "--attacks", "clean,pgd10", "--storage-path", str(tmp_path / "evals"),
                  "--summary-json", str(tmp_path / "e.json")])
    assert exit_.value.code == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert (e["dataset"], e["n_examples"]) == (s["dataset"], 9)  # the held-out 20% of 45 images


@pytest.mark.slow
def test_folder_and_npz_on_s3_are_copied_once(tmp_path, monkeypatch):
    """``folder:s3://...`` is mirrored once per node as a remote --data-dir is, ``npz:s3://...`` cached once."""
    from cluster import S3Server

    from raydistill import storage

    s3 = S3Server(tmp_path)
    try:
        for k, v in {**s3.env, "RAYDISTILL_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(k, v)
        write_images(tmp_path / "pets", {"cat": 5, "dog": 5})
        np.savez(tmp_path / "a.npz", x=np.zeros((10, 8, 8, 3), np.uint8), y=np.arange(10) % 2)
        storage.upload(tmp_path / "pets", s3.uri("pets"))
        storage.upload(tmp_path / "a.npz", s3.uri("a.npz"))
        a = load_dataset(f"folder:{s3.uri('pets')}", val_size=2)
        b = load_dataset(f"folder:{s3.uri('pets')}/", val_size=2)  # the same folder, the same copy
        assert a.classes == ("cat", "dog") and torch.equal(a.test_x, b.test_x)
        assert (tmp_path / "moto.log").read_text().count("GET /raydistill/pets/cat/000.png HTTP") == 1
        c = load_dataset(f"npz:{s3.uri('a.npz')}", val_size=2)
        assert c.in_shape == (3, 8, 8) and len(c.test_y) == 2
        with pytest.raises(UsageError, match="is not a folder in the storage"):
            DATASETS.get(f"folder:{s3.uri('nowhere')}")
    finally:
        s3.stop()


def test_a_study_reads_its_folder_relative_to_the_study_file(tmp_path, monkeypatch):
    from raydistill.study import spec
    from raydistill.study.cost import CostModel

    write_images(tmp_path / "s" / "pets", {"cat": 10, "dog": 10})
    write_images(tmp_path / "s" / "solo", {"cat": 10})
    text = ("dataset: folder:{}\nstudent: small_cnn\nmethods: [pgd_at]\n"
            "search: {{budget: {{trial_epochs: 2}}, epochs: 2}}\n")
    (tmp_path / "s" / "ok.yaml").write_text(text.format("pets"))
    (tmp_path / "s" / "bad.yaml").write_text(text.format("solo"))
    monkeypatch.chdir(tmp_path)  # not the study's folder
    s = spec.load(tmp_path / "s" / "ok.yaml")
    assert s.dataset == f"folder:{tmp_path / 's' / 'pets'}"
    assert CostModel(s.dataset, s.estimate).sizes() == (16, 4)  # the plan's estimate counts the data's images
    with pytest.raises(UsageError, match=r"bad.yaml: dataset: dataset folder:\S+/solo: one class only \('cat'\)"):
        spec.load(tmp_path / "s" / "bad.yaml")
