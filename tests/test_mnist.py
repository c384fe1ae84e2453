"""MNIST and Fashion-MNIST (raydistill/mnist.py): the IDX reader on small files written in the exact format (gzip
and raw), its one-line errors, the download from mirrors (a real HTTP server on 127.0.0.1), and the real
Fashion-MNIST files of Debian's package dataset-fashion-mnist (CI installs it: .ci/install-datasets.sh): counts,
class balance, value range, the first images' digests, and equality with torchvision's own FashionMNIST reader."""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from raydistill import mnist
from raydistill.data import DATASETS, load_dataset, to_float
from raydistill.errors import UsageError

DEBIAN = Path(mnist.DEBIAN_FASHION)
HAVE_DEBIAN = mnist.complete(DEBIAN)
# skipped where the package is absent, except in CI (.ci/run installs it and sets RAYDISTILL_NEED_FASHION_MNIST=1)
needs_package = pytest.mark.skipif(not HAVE_DEBIAN and not os.environ.get("RAYDISTILL_NEED_FASHION_MNIST"),
                                   reason="Debian's dataset-fashion-mnist is not installed (make datasets, or "
                                          "bash .ci/install-datasets.sh)")


# ----------------------------------------------------------------------------- small files, the exact format
def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: 0, 0, 0x08, ndim, big-endian int32 dimensions, the bytes."""
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def small_release(folder: Path, gz: bool, n_train: int = 40, n_test: int = 20) -> dict[str, str]:
    """The four files of a small release in ``folder`` (image i of a split: every pixel (i * 7 + label) % 256,
    label i % 10); returns the SHA-256 of each file's decompressed contents."""
    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = ((np.arange(n) * 7 + labels) % 256).astype(np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name, data = f"{prefix}-{kind}-ubyte", idx_bytes(array)
            digests[name] = hashlib.sha256(data).hexdigest()
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return digests


@pytest.fixture
def pinned(monkeypatch):
    """``pinned(digests, mirrors=())``: MNIST's release with these digests (and mirrors), as the CIFAR tests
    point torchvision at their own archive."""
    def pin(digests: dict, mirrors=()):
        release = mnist.RELEASES["mnist"]
        monkeypatch.setitem(mnist.RELEASES, "mnist", mnist.Release(release.title, release.folder,
                                                                   tuple(mirrors) or release.mirrors, digests))
    return pin


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_small_release_reads_in_torchvision_layout_and_flat(tmp_path, pinned, gz):
    for folder in (tmp_path / "a" / "MNIST" / "raw", tmp_path / "b"):
        pinned(small_release(folder, gz))
        d = load_dataset("mnist", folder.parent.parent if folder.name == "raw" else folder, val_size=0)
        assert (d.train_x.shape, d.test_x.shape, d.train_x.dtype) == ((40, 1, 28, 28), (20, 1, 28, 28), torch.uint8)
        assert d.train_y.tolist() == [i % 10 for i in range(40)] and d.test_y.dtype == torch.int64
        assert d.train_x[:, 0, 3, 5].tolist() == [(i * 7 + i % 10) % 256 for i in range(40)]
        assert (d.num_classes, d.in_shape, d.hflip, d.crop_pad) == (10, (1, 28, 28), False, 0)


def test_registry_facts_and_defaults():
    for name, eps, step, steps in (("mnist", 0.3, 0.01, 40), ("fashion_mnist", 0.1, 0.025, 10)):
        spec = DATASETS.get(name)
        assert (spec.num_classes, spec.in_shape) == (10, (1, 28, 28))
        assert {k: spec.defaults[k] for k in ("eps", "step_size", "attack_steps", "student", "lr", "batch_size")} == \
            dict(eps=eps, step_size=step, attack_steps=steps, student="trades_smallcnn", lr=0.01, batch_size=128)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_truncated_wrong_magic_and_foreign_files_are_one_line(tmp_path, pinned):
    data = tmp_path / "data"
    folder = data / "MNIST" / "raw"
    with pytest.raises(UsageError) as err:
        load_dataset("mnist", data, val_size=0)
    assert one_line(err).startswith(f"MNIST not found in --data-dir {data}: expected the four IDX files")
    assert "--download" in one_line(err)
    digests = small_release(folder, gz=True)
    pinned(digests)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UsageError, match=r"MNIST in .*raw is incomplete: t10k-labels-idx1-ubyte \(raw or \.gz\) missing"):
        load_dataset("mnist", data, val_size=0)
    small_release(folder, gz=True)
    whole = (folder / "train-images-idx3-ubyte.gz").read_bytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(whole[: len(whole) // 2])  # a gzip cut off
    with pytest.raises(UsageError) as err:
        load_dataset("mnist", data, val_size=0)
    assert one_line(err).startswith(f"cannot read {folder / 'train-images-idx3-ubyte.gz'}: ")
    (folder / "train-images-idx3-ubyte.gz").unlink()
    raw = gzip.decompress(whole)
    (folder / "train-images-idx3-ubyte").write_bytes(raw[:-100])  # raw, cut off: preferred to no .gz
    with pytest.raises(UsageError) as err:
        load_dataset("mnist", data, val_size=0)
    assert "train-images-idx3-ubyte is truncated: 31260 bytes of data for dimensions 40x28x28 (31360 bytes)" in one_line(err)
    (folder / "train-images-idx3-ubyte").write_bytes(raw[:2] + b"\x0d" + raw[3:])  # type code: float, not ubyte
    with pytest.raises(UsageError) as err:
        load_dataset("mnist", data, val_size=0)
    assert "is not an IDX file of unsigned bytes with 3 dimensions (magic number 0x00000803 expected, found 00000d03)" \
        in one_line(err)
    (folder / "train-images-idx3-ubyte").write_bytes(raw)
    assert len(load_dataset("mnist", data, val_size=0).train_y) == 40
    pinned({**digests, "t10k-images-idx3-ubyte": "0" * 64})  # not the release's file
    with pytest.raises(UsageError) as err:
        load_dataset("mnist", data, val_size=0)
    assert "t10k-images-idx3-ubyte.gz is not the official MNIST t10k-images-idx3-ubyte: the SHA-256 of its contents" \
        in one_line(err)


def test_the_real_digests_refuse_other_files(tmp_path):
    small_release(tmp_path / "MNIST" / "raw", gz=False)
    with pytest.raises(UsageError, match="is not the official MNIST train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path, val_size=0)


def test_train_size_is_a_fixed_stratified_subset():
    a, b = (load_dataset("digits", train_size=200) for _ in range(2))
    assert len(a.train_y) == 200 and torch.equal(a.train_x, b.train_x)
    counts = a.train_y.bincount()
    assert len(counts) == 10 and int(counts.max() - counts.min()) <= 1  # stratified: digits' classes are near equal
    with pytest.raises(UsageError, match="--train-size 5000: digits has 1214 training images besides the validation"):
        load_dataset("digits", train_size=5000)


# ----------------------------------------------------------------------------- the download
class Mirror:
    """A folder served over HTTP on 127.0.0.1 (``url``), counting GET requests (less torchvision's redirect
    probes: a GET with a ``Method: HEAD`` header)."""

    def __init__(self, folder: Path):
        self.gets = self.requests = 0
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                server.gets += self.headers.get("Method") != "HEAD"
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_from_the_first_mirror_that_serves_verified_once_and_put_in_place(tmp_path, pinned):
    digests = small_release(tmp_path / "served", gz=True)
    dead, live = Mirror(tmp_path / "empty"), Mirror(tmp_path / "served")
    (tmp_path / "empty").mkdir()
    data = tmp_path / "data"
    try:
        pinned({**digests, "train-labels-idx1-ubyte": "0" * 64}, [dead.url, live.url])
        with pytest.raises(UsageError) as err:  # downloaded, but not the release: nothing put in place
            load_dataset("mnist", data, download=True, val_size=0)
        assert "is not the official MNIST train-labels-idx1-ubyte" in one_line(err)
        assert sorted(p.name for p in data.iterdir()) == [".raydistill-download.lock"]
        pinned(digests, [dead.url, live.url])
        d = load_dataset("mnist", data, download=True, val_size=0)
        assert (len(d.train_y), len(d.test_y)) == (40, 20)
        assert sorted(p.name for p in (data / "MNIST" / "raw").iterdir()) == sorted(n + ".gz" for n in mnist.FILES)
        assert sorted(p.name for p in data.iterdir()) == [".raydistill-download.lock", "MNIST"]  # no partial folder
        gets = live.gets
        assert gets == 8 and dead.requests == 8  # two downloads of 4 files, each asked of the dead mirror first
        load_dataset("mnist", data, download=True, val_size=0)
        assert live.gets == gets  # present: nothing downloaded again
        pinned(digests, [dead.url])
        with pytest.raises(UsageError) as err:
            load_dataset("mnist", tmp_path / "other", download=True, val_size=0)
        assert one_line(err).startswith(f"could not download MNIST's train-images-idx3-ubyte.gz into --data-dir "
                                        f"{tmp_path / 'other'} from any mirror ({dead.url}: ")
    finally:
        dead.stop()
        live.stop()


# ----------------------------------------------------------------------------- the real files
@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion_mnist", "/nonexistent-data-dir", val_size=0)  # from Debian's folder


# sha256 of the uint8 bytes of the first 8 images of each split, and their labels (Debian's package 0.0~git20200523)
FIRST8 = {"train": ("8a6fbd6eff9f489549edbf60bd50c26e12f0c5551542f37a433fa879a7b283d5", [9, 0, 0, 3, 0, 2, 7, 2]),
          "test": ("8ffd77e71248ff36ca6971e3e84fd894053f181e437e47bec5fcc5e4ca758830", [9, 2, 1, 1, 6, 1, 4, 6])}


@needs_package
def test_real_fashion_mnist_counts_balance_range_and_first_images(fashion):
    d = fashion
    assert (d.train_x.shape, d.test_x.shape) == ((60000, 1, 28, 28), (10000, 1, 28, 28))
    assert d.train_y.bincount().tolist() == [6000] * 10 and d.test_y.bincount().tolist() == [1000] * 10
    assert d.train_x.dtype == torch.uint8 and (int(d.train_x.min()), int(d.train_x.max())) == (0, 255)
    x = to_float(d.test_x[:100])
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    for split, (x, y) in (("train", (d.train_x, d.train_y)), ("test", (d.test_x, d.test_y))):
        assert (hashlib.sha256(x[:8].numpy().tobytes()).hexdigest(), y[:8].tolist()) == FIRST8[split], split


@needs_package
def test_real_fashion_mnist_equals_torchvision_reader_gzip_and_raw(tmp_path, fashion):
    """torchvision's FashionMNIST reads <root>/FashionMNIST/raw/ (decompressed files); ours reads Debian's .gz
    files (the fixture) and the same decompressed files (raw), in torchvision's layout and flat."""
    import torchvision

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in mnist.FILES:
        with gzip.open(DEBIAN / (name + ".gz")) as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    ours_raw = load_dataset("fashion_mnist", tmp_path, val_size=0)
    for train in (True, False):
        tv = torchvision.datasets.FashionMNIST(root=str(tmp_path), train=train, download=False)
        for d in (fashion, ours_raw):
            x, y = (d.train_x, d.train_y) if train else (d.test_x, d.test_y)
            assert torch.equal(x[:, 0], tv.data) and torch.equal(y, tv.targets)
    flat = load_dataset("fashion_mnist", raw, val_size=0)  # --data-dir naming the folder of the files
    assert torch.equal(flat.test_x, fashion.test_x)
