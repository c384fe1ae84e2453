"""MNIST and Fashion-MNIST: the IDX reader, where the four files are found, their download and verification.

Registers the datasets ``mnist`` and ``fashion_mnist`` (1x28x28 uint8 images, 10 classes, 60,000 training and
10,000 test images) in ``data.DATASETS``; ``data`` imports this module, so the names always exist.

The files are the four of the official releases, gzip-compressed or not, under the official names
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
each optionally ``.gz``). They are looked for, in this order, in

1. ``<--data-dir>/FashionMNIST/raw`` (``MNIST/raw``): torchvision's layout, where ``--download`` puts them;
2. ``<--data-dir>`` itself (e.g. ``--data-dir /usr/share/datasets/fashion-mnist``);
3. for Fashion-MNIST, ``/usr/share/datasets/fashion-mnist``: Debian's package ``dataset-fashion-mnist``;

and, when none holds them and ``--download`` is given, downloaded from the official mirrors into 1. (under the
lock of ``downloads.fetch_files``: once per node, complete or not at all).

Verification: every read checks the structure (the IDX magic number, the dimensions, the exact length, as many
labels as images, labels 0-9) and the SHA-256 of the decompressed contents against the official release's
(``Release.sha256``). Debian recompresses the archives, so the archives' digests differ from the official
ones while the contents are the same: the contents are what is pinned. Fashion-MNIST's digests were computed
from Debian's package (0.0~git20200523.55506a9-1) and agree with the md5 sums of the decompressed files that
several public projects pin next to the official archives' md5 sums; MNIST's are the SHA-256 sums of the
decompressed official files that many public projects pin (not computed here: no MNIST package to read).
"""
from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import downloads
from .dataspec import _Splits, register
from .errors import UsageError, first_line

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
UBYTE = 0x08  # the IDX type code of unsigned bytes: the only one these releases use
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class Release:
    """One official release: its name, torchvision's folder, mirrors, digests and a system folder."""

    title: str
    folder: str  # torchvision's <root>/<folder>/raw
    mirrors: tuple[str, ...]  # base URLs serving FILES + ".gz"
    sha256: dict  # file name (decompressed) -> SHA-256 of its decompressed contents
    system_dir: str | None = None  # where a system package installs the files
    package: str | None = None  # that package's name


RELEASES = {
    "fashion_mnist": Release(
        "Fashion-MNIST", "FashionMNIST", ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {"train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
         "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
         "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
         "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"},
        DEBIAN_FASHION, "dataset-fashion-mnist"),
    "mnist": Release(
        "MNIST", "MNIST", ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {"train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
         "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
         "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
         "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"}),
}


# ----------------------------------------------------------------------------- the IDX format
def file_of(folder: Path, name: str) -> Path | None:
    """``folder/name`` or, failing that, ``folder/name.gz``; None when neither is a file."""
    for path in (folder / name, folder / (name + ".gz")):
        if path.is_file():
            return path
    return None


def read_bytes(path: Path) -> bytes:
    """The file's contents, decompressed when its name ends in ``.gz``."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError, zlib.error) as exc:
        raise UsageError(f"cannot read {path}: {first_line(exc)} (a truncated or damaged file?); "
                         f"delete it and get the file again") from None


def parse_idx(data: bytes, ndim: int, where: str) -> np.ndarray:
    """An IDX array of unsigned bytes with ``ndim`` dimensions from its bytes (``where`` names it in errors).

    Header: two zero bytes, the type code (0x08: unsigned byte), the number of dimensions, then each
    dimension as a big-endian 32-bit integer; the data follow, exactly as many bytes as the dimensions say.
    """
    head = 4 + 4 * ndim
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != UBYTE or data[3] != ndim:
        magic = data[:4].hex() if len(data) >= 4 else f"{len(data)} bytes"
        raise UsageError(f"{where} is not an IDX file of unsigned bytes with {ndim} dimension{'s' * (ndim > 1)} "
                         f"(magic number 0x{(0x0800 + ndim):08x} expected, found {magic})")
    if len(data) < head:
        raise UsageError(f"{where} is truncated: {len(data)} bytes, shorter than its {head}-byte header")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    if len(data) != head + size:
        state = "truncated" if len(data) < head + size else "longer than its header says"
        raise UsageError(f"{where} is {state}: {len(data) - head} bytes of data for dimensions "
                         f"{'x'.join(map(str, dims))} ({size} bytes); delete it and get the file again")
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(dims)


# ----------------------------------------------------------------------------- finding, fetching, reading
def candidates(release: Release, data_dir: Path) -> list[Path]:
    """Where the files are looked for, in order (see the module's docstring)."""
    out = [data_dir / release.folder / "raw", data_dir]
    return out + ([Path(release.system_dir)] if release.system_dir else [])


def complete(folder: Path) -> bool:
    return all(file_of(folder, name) is not None for name in FILES)


def locate(release: Release, data_dir: Path, download: bool) -> Path:
    """The folder holding the four files: found (``candidates``), else downloaded with ``download``."""
    found = next((c for c in candidates(release, data_dir) if complete(c)), None)
    if found is not None:
        return found
    names = ", ".join(FILES)
    get = (f"install Debian's package ({'apt-get install ' + release.package}, which puts them in "
           f"{release.system_dir}), or allow downloading (--download)" if release.package
           else "or allow downloading (--download)")
    hint = f"expected the four IDX files ({names}; each raw or .gz) in {data_dir / release.folder / 'raw'}"
    if download:
        downloads.fetch_files([n + ".gz" for n in FILES], release.mirrors, data_dir, f"{release.folder}/raw",
                              what=release.title, hint=hint, complete=complete,
                              check=lambda folder: [read_split(release, folder, s) for s in ("train", "t10k")])
        return data_dir / release.folder / "raw"
    partial = next((c for c in candidates(release, data_dir)[:2] if any(file_of(c, n) for n in FILES)), None)
    if partial is not None:
        missing = [n for n in FILES if file_of(partial, n) is None]
        raise UsageError(f"{release.title} in {partial} is incomplete: {', '.join(missing)} (raw or .gz) missing; "
                         f"{get.replace('or allow', 'or delete the folder and allow')}")
    raise UsageError(f"{release.title} not found in --data-dir {data_dir}: {hint} or in {data_dir}; {get}")


def read_split(release: Release, folder: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of the split whose files start with ``prefix`` (``train``, ``t10k``), verified:
    uint8 (N, 1, H, W) and int64 (N,)."""
    out = []
    for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
        name = f"{prefix}-{kind}-ubyte"
        path = file_of(folder, name)
        if path is None:
            raise UsageError(f"{release.title}: {folder / name} (raw or .gz) is missing")
        data = read_bytes(path)
        array = parse_idx(data, ndim, str(path))
        digest = hashlib.sha256(data).hexdigest()
        if release.sha256.get(name, digest) != digest:
            raise UsageError(f"{path} is not the official {release.title} {name}: the SHA-256 of its contents is "
                             f"{digest[:16]}..., the release's {release.sha256[name][:16]}...; delete it and get "
                             f"the file again")
        out.append(array)
    images, labels = out
    if len(images) != len(labels) or (len(labels) and labels.max() > 9):
        raise UsageError(f"{release.title} in {folder}: {len(images)} {prefix} images but {len(labels)} labels"
                         f"{', labels above 9' if len(labels) and labels.max() > 9 else ''}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_release(key: str, data_dir: Path, download: bool) -> _Splits:
    """The two splits of release ``key`` (a ``RELEASES`` name). No flips or crops: TRADES' MNIST code
    trains on the plain images (``transforms.ToTensor()``), and so does every setting cited below."""
    release = RELEASES[key]
    folder = locate(release, Path(data_dir), download)
    train_x, train_y = read_split(release, folder, "train")
    test_x, test_y = read_split(release, folder, "t10k")
    return _Splits(train_x, train_y, test_x, test_y, 10, hflip=False, crop_pad=0)


# ----------------------------------------------------------------------------- the datasets
# Schedule (both): TRADES' MNIST code (yaodongyu/TRADES, train_trades_mnist.py: SmallCNN, batch 128, SGD lr 0.01,
# momentum 0.9, no weight decay, 100 epochs, lr x0.1 from its epoch 55 counting from 1, i.e. milestone 54 here;
# its later decays at 75 and 90 are never reached: an if/elif order). Student: that SmallCNN (trades_smallcnn).
MNIST_FAMILY = dict(epochs=100, batch_size=128, lr=0.01, lr_milestones=[54], weight_decay=0.0, student="trades_smallcnn")


# MNIST's threat model: L-inf eps 0.3, PGD of 40 steps of 0.01 for training, as in Madry et al. (ICLR 2018,
# the MNIST experiments: 40 PGD iterations of step 0.01 at eps 0.3) and TRADES (Zhang et al., ICML
# 2019; train_trades_mnist.py: epsilon 0.3, num-steps 40, step-size 0.01; TRADES' beta there is 1.0). Note that
# evaluate's PGD-20 keeps the training step (0.01: at most 0.2 of travel); TRADES evaluates with PGD-40, step
# 0.01; give evaluate --step-size for a stronger PGD-20.
@register("mnist", 10, (1, 28, 28), eps=0.3, step_size=0.01, attack_steps=40, **MNIST_FAMILY)
def load_mnist(data_dir: Path, download: bool) -> _Splits:
    """MNIST (LeCun et al.): 60,000 + 10,000 handwritten digits, 28x28 grayscale (the module's docstring)."""
    return load_release("mnist", data_dir, download)


# Fashion-MNIST's threat model: L-inf eps 0.1, the radius most used for it: Wong & Kolter (ICML 2018, the convex
# outer polytope; locuslab/convex_adversarial examples/fashion_mnist.py: epsilon 0.1), CROWN-IBP (Zhang et al.,
# ICLR 2020; config/fashion-mnist_crown.json: epsilon 0.1) and the work that compares with them. No PGD setting
# is standard for it: we take the ratio of the CIFAR setting all the distillation papers here use (step eps/4,
# 10 steps: 2.5 eps of travel), i.e. step 0.025 and 10 steps; 40 steps of 0.01 as on MNIST
# would cost 4 times as much for the same radius.
@register("fashion_mnist", 10, (1, 28, 28), eps=0.1, step_size=0.025, attack_steps=10, **MNIST_FAMILY)
def load_fashion_mnist(data_dir: Path, download: bool) -> _Splits:
    """Fashion-MNIST (Xiao et al., Zalando, 2017): 60,000 + 10,000 fashion images, 28x28 grayscale, 10
    classes of 7,000 (the module's docstring)."""
    return load_release("fashion_mnist", data_dir, download)
