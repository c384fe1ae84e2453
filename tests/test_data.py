"""Datasets (real on-disk formats, written small), holdout splits, augmentation and sharded batching."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from cifar_server import dump_py2, images, write_cifar10
from raydistill.data import DATASETS, augment_batch, iterate_batches, load_dataset, to_float
from raydistill.errors import UsageError


# ----------------------------------------------------------------------------- CIFAR in its exact pickle format

@pytest.fixture
def md5_free(monkeypatch):
    """Our small files cannot match the official md5 sums: let torchvision only check that they exist."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))


def test_fake_cifar_pickles_have_the_official_encoding(tmp_path):
    folder = write_cifar10(tmp_path)
    with open(folder / "data_batch_1", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    assert set(raw) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (6, 3072)


def test_cifar10_real_format(tmp_path, md5_free):
    write_cifar10(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path, val_size=10)
    assert (ds.num_classes, ds.in_shape, ds.hflip, ds.crop_pad) == (10, (3, 32, 32), True, 4)
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (20, 3, 32, 32)
    assert len(ds.val_y) == 10 and sorted(ds.val_y.tolist()) == list(range(10))  # stratified: one per class
    assert ds.test_x.shape == (10, 3, 32, 32) and ds.test_y.tolist() == [i % 10 for i in range(10)]
    # channel planes and pixel order survive the (N, 3072) -> (N, 3, 32, 32) conversion
    assert (ds.test_x[:, 0, 1:] == ds.test_y[:, None, None]).all()
    assert (ds.test_x[:, 1, 3, 3] == 200 + torch.arange(10)).all() and (ds.test_x[:, 2] == 7).all()
    assert (ds.test_x[:, 0, 0, 5] == 255).all() and (ds.test_x[:, 0, 0, 4] == ds.test_y).all()
    # labels stay with their images through the holdout
    for x, y in ((ds.train_x, ds.train_y), (ds.val_x, ds.val_y)):
        assert (x[:, 0, 1, 1] == y).all()


def test_cifar100_real_format(tmp_path, md5_free):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, n in (("train", 200), ("test", 100)):
        fine = [i % 100 for i in range(n)]
        dump_py2(folder / split, {"filenames": ["x.png"] * n, "batch_label": split, "fine_labels": fine,
                                   "coarse_labels": [f // 5 for f in fine], "data": images(fine, 0)})
    dump_py2(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                                "coarse_label_names": [f"s{i}" for i in range(20)]})
    ds = load_dataset("cifar100", data_dir=tmp_path, val_size=0)
    assert ds.num_classes == 100 and ds.train_x.shape == (200, 3, 32, 32)
    assert ds.train_y.tolist() == [i % 100 for i in range(200)]  # fine labels, not coarse
    assert (ds.train_x[:, 0, 1, 1] == ds.train_y).all()
    assert ds.val_x is ds.test_x and ds.val_y is ds.test_y  # val_size=0: validate on test, as the papers do


def test_cifar_missing_offline_names_the_data_dir(tmp_path):
    with pytest.raises(UsageError) as err:
        load_dataset("cifar10", data_dir=tmp_path / "nowhere")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg and "cifar-10-batches-py" in msg


def test_cifar_files_failing_md5_are_reported(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(UsageError, match="fail torchvision's md5 check"):
        load_dataset("cifar10", data_dir=tmp_path)


# ----------------------------------------------------------------------------- TinyImageNet folder layout

def test_tinyimagenet_official_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]  # file order is not class order: classes are the sorted wnids
    colour = {"n01": (250, 10, 10), "n02": (10, 250, 10), "n03": (10, 10, 250)}
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(4):
            Image.new("RGB", (64, 64), colour[w]).save(root / "train" / w / "images" / f"{w}_{k}.JPEG")
    Image.new("L", (64, 64), 128).save(root / "train" / "n02" / "images" / "n02_gray.JPEG")  # some are grayscale
    rows = []
    for i, w in enumerate(["n02", "n01", "n03", "n01"]):
        Image.new("RGB", (64, 64), colour[w]).save(root / "val" / "images" / f"val_{i}.JPEG")
        rows.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")

    ds = load_dataset("tinyimagenet", data_dir=tmp_path, val_size=3)
    assert (ds.num_classes, ds.in_shape, ds.hflip, ds.crop_pad) == (3, (3, 64, 64), True, 4)
    assert ds.train_x.dtype == torch.uint8 and len(ds.train_y) + len(ds.val_y) == 13
    assert sorted(ds.val_y.tolist()) == [0, 1, 2]
    assert ds.test_y.tolist() == [1, 0, 2, 0]
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        dominant = x.float().mean(dim=(2, 3)).argmax(1)  # n01 red, n02 green, n03 blue
        gray = (x.float().std(dim=1) < 3).all(dim=(1, 2))
        assert ((dominant == y) | gray).all()
    assert (ds.train_x.float().std(dim=1) < 3).all(dim=(1, 2)).sum() == 1  # the grayscale one, now RGB


def test_tinyimagenet_missing_offline_names_the_data_dir(tmp_path):
    with pytest.raises(UsageError) as err:
        load_dataset("tinyimagenet", data_dir=tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path / "tiny-imagenet-200") in str(err.value)


# ----------------------------------------------------------------------------- digits and synthetic

def test_digits_fixed_stratified_split():
    torch.manual_seed(123)
    np.random.seed(123)
    a = load_dataset("digits")
    torch.manual_seed(7)
    b = load_dataset("digits")
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.num_classes, a.in_shape, a.hflip, a.crop_pad) == (10, (1, 8, 8), False, 1)
    assert a.train_x.dtype == torch.float32 and a.train_x.min() == 0 and a.train_x.max() == 1
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (1214, 134, 449)
    train_val = torch.cat([a.train_y, a.val_y]).bincount()
    full = train_val + a.test_y.bincount()
    for split, frac, pool in ((a.test_y, 449 / 1797, full), (a.val_y, 134 / 1348, train_val)):
        assert ((split.bincount(minlength=10) - frac * pool).abs() <= 1).all()


def test_val_size_options():
    assert len(load_dataset("digits", val_size=50).val_y) == 50
    ds = load_dataset("digits", val_size=0)
    assert ds.val_x is ds.test_x and len(ds.train_y) == 1348
    with pytest.raises(UsageError, match="val_size must be 0"):
        load_dataset("digits", val_size=5000)


def test_synthetic_deterministic_learnable_any_shape():
    opts = dict(shape="1x16x24", num_classes=4, n_train=400, n_test=200)
    a, b = load_dataset("synthetic", seed=3, **opts), load_dataset("synthetic", seed=3, **opts)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, load_dataset("synthetic", seed=4, **opts).train_x)
    assert a.in_shape == (1, 16, 24) and a.train_x.dtype == torch.float32
    assert 0 <= a.train_x.min() and a.train_x.max() <= 1 and (a.crop_pad, a.hflip) == (2, True)
    means = torch.stack([a.train_x[a.train_y == c].mean(0) for c in range(4)])  # nearest class mean
    pred = torch.cdist(a.test_x.flatten(1), means.flatten(1)).argmin(1)
    assert (pred == a.test_y).float().mean() > 0.9
    assert load_dataset("synthetic", shape=(3, 64, 64), n_train=100, n_test=10).crop_pad == 4


def test_dataset_registry_and_options():
    assert set(DATASETS.names()) == {"cifar10", "cifar100", "tinyimagenet", "digits", "synthetic", "mnist", "fashion_mnist"}
    with pytest.raises(UsageError, match="unknown dataset 'emnist'; choose from: cifar10"):
        load_dataset("emnist")
    with pytest.raises(UsageError, match="dataset 'digits' has no option shape; it accepts: none"):
        load_dataset("digits", shape=(1, 8, 8))


def test_to_float():
    assert torch.equal(to_float(torch.tensor([0, 51, 255], dtype=torch.uint8)), torch.tensor([0.0, 0.2, 1.0]))
    x = torch.rand(3)
    assert to_float(x) is x


# ----------------------------------------------------------------------------- augmentation

def test_crops_are_shifted_copies():
    x = torch.rand(32, 3, 8, 8)
    out = augment_batch(x, crop_pad=2, hflip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):
        match = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert len(match) == 1
        offsets.add(match[0])
    assert len(offsets) > 5


def test_flips_flip_and_augmentation_is_seeded():
    x = torch.randint(0, 256, (64, 1, 4, 6), dtype=torch.uint8)
    out = augment_batch(x, crop_pad=0, hflip=True, generator=torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped | kept).all() and 10 < flipped.sum() < 54
    again = augment_batch(x, crop_pad=0, hflip=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert augment_batch(x, crop_pad=0, hflip=False, generator=None) is x


# ----------------------------------------------------------------------------- batching

def _collect(n, **kw):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    y = torch.arange(n)
    return [(xb, yb) for xb, yb in iterate_batches(x, y, **kw)]


def test_ranks_are_disjoint_equal_and_cover_the_data():
    n, world = 103, 4
    per_rank = [torch.cat([yb for _, yb in _collect(n, batch_size=8, shuffle=True, seed=5, epoch=2,
                                                    rank=r, world_size=world)]) for r in range(world)]
    assert all(len(p) == 26 for p in per_rank)  # padded: ceil(103 / 4) each
    everything = torch.cat(per_rank)
    assert set(everything.tolist()) == set(range(n)) and len(everything) == 104  # one wrap-around duplicate
    assert not torch.equal(everything[:n], torch.arange(n))  # shuffled


def test_batches_are_deterministic_per_seed_and_epoch():
    kw = dict(batch_size=10, shuffle=True, rank=1, world_size=2)
    first = torch.cat([y for _, y in _collect(50, seed=0, epoch=3, **kw)])
    assert torch.equal(first, torch.cat([y for _, y in _collect(50, seed=0, epoch=3, **kw)]))
    assert not torch.equal(first, torch.cat([y for _, y in _collect(50, seed=0, epoch=4, **kw)]))
    assert not torch.equal(first, torch.cat([y for _, y in _collect(50, seed=1, epoch=3, **kw)]))


def test_unshuffled_unaugmented_batches_are_the_data():
    batches = _collect(25, batch_size=10, shuffle=False, seed=0, epoch=0)
    assert [len(y) for _, y in batches] == [10, 10, 5]
    for xb, yb in batches:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and torch.equal(xb.flatten(), yb.float())
    assert [len(y) for _, y in _collect(25, batch_size=10, shuffle=False, seed=0, epoch=0, drop_last=True)] == [10, 10]


def test_augmented_batches_keep_labels_and_reproduce():
    n = 40
    x = (torch.arange(n, dtype=torch.uint8) + 100).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    y = torch.arange(n)
    kw = dict(batch_size=16, shuffle=True, seed=9, epoch=1, augment=True, crop_pad=1, hflip=True)
    run = [xb for xb, yb in iterate_batches(x, y, **kw)]
    for xb, yb in iterate_batches(x, y, **kw):
        assert xb.shape[1:] == (3, 8, 8) and 0 <= xb.min() and xb.max() <= 1
        assert torch.allclose(xb.amax(dim=(1, 2, 3)), (yb + 100).float() / 255)  # padding only adds zeros
        assert (xb == 0).any(dim=(1, 2, 3)).any()  # some crops shifted in zero padding
    assert all(torch.equal(a, b) for a, b in zip(run, (xb for xb, _ in iterate_batches(x, y, **kw))))
