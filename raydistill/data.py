"""Datasets held in memory as tensors, a fixed validation holdout, GPU-friendly augmentation and sharded batching.

Every dataset loads completely into memory (CIFAR 50k/10k, TinyImageNet 100k/10k, MNIST and Fashion-MNIST
60k/10k (``raydistill.mnist``, registered from there), digits, synthetic):
images are uint8 (N, C, H, W) when the source is uint8 and float32 in [0, 1] otherwise; labels are int64.
``iterate_batches`` turns them into float [0, 1] batches on the training device, sharded like
``DistributedSampler`` and reproducible from (seed, epoch, rank).

CIFAR integrity: the files are read by torchvision's CIFAR10/CIFAR100 classes, which check the official
md5 sums. Present files that fail that check are reported as a one-line UsageError (delete them and
download again) rather than silently accepted; the tests replace torchvision's ``check_integrity``.

``--data-dir`` is a local folder or a URI (``s3://``, ``gs://``) of one, which each node copies once
(``storage.node_mirror``); every reader goes through ``load_dataset``. ``--download`` fetches a missing
dataset once per node, under a lock, complete or not at all (``downloads.fetch``).
"""
from __future__ import annotations

import inspect
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import downloads, storage
from .errors import UsageError, first_line
from .dataspec import DATASETS, DatasetSpec, _Splits, register, stratified_split  # noqa: F401 (their home)

DEFAULT_DATA_DIR = "data"
VAL_FRACTION, VAL_CAP = 0.1, 1000


@dataclass
class Dataset:
    """Train / validation / test tensors and the augmentation that suits them."""

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_shape: tuple[int, int, int]
    hflip: bool  # random horizontal flips make sense (natural images, not digits)
    crop_pad: int  # random-crop padding in pixels (0: no crops)
    classes: tuple[str, ...] | None = None  # the class names where the data has them (folder:, npz:)


CIFAR_DEFAULTS = dict(eps=8 / 255, step_size=2 / 255, epochs=120, batch_size=128, lr=0.1, lr_milestones=[100, 110])


def load_dataset(name: str, data_dir=None, download: bool = False, val_size: int | None = None,
                 train_size: int | None = None, **options) -> Dataset:
    """Load dataset ``name`` and carve a fixed, stratified validation holdout out of its training split.

    ``data_dir``: a folder, or a URI of one (copied to this node once, then read there). ``val_size``:
    number of held-out training samples (default 10% of train, at most 1000); ``0`` uses the test split
    as validation (as the original papers' code does). ``train_size``: train on a fixed, stratified subset of
    that many of the remaining training images (default all). ``options`` go to the loader (only ``synthetic``
    takes any: shape, num_classes, n_train, n_test, seed).
    """
    loader = DATASETS.get(name).loader
    accepted = [p for p in inspect.signature(loader).parameters if p not in ("data_dir", "download")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UsageError(f"dataset '{name}' has no option {', '.join(unknown)}; "
                         f"it accepts: {', '.join(accepted) or 'none'}")
    source = str(data_dir or DEFAULT_DATA_DIR)
    local = storage.node_mirror(source)  # a remote --data-dir: this node's copy, made once per node
    try:
        s = loader(data_dir=local, download=download, **options)
    except UsageError as exc:
        if not storage.is_remote(source):
            raise
        raise UsageError(f"{exc} (--data-dir {source}, copied to this node as {local})") from None
    n = len(s.train_y)
    val_size = min(VAL_CAP, int(VAL_FRACTION * n)) if val_size is None else int(val_size)
    if val_size == 0:
        train_x, train_y, val_x, val_y = s.train_x, s.train_y, s.test_x, s.test_y
    else:
        if not s.num_classes <= val_size <= n - s.num_classes:
            raise UsageError(f"val_size must be 0 (validate on the test split) or between {s.num_classes} "
                             f"and {n - s.num_classes} for {name}, not {val_size}")
        keep, held = stratified_split(s.train_y, val_size)
        train_x, train_y, val_x, val_y = s.train_x[keep], s.train_y[keep], s.train_x[held], s.train_y[held]
    if train_size is not None:
        if not s.num_classes <= int(train_size) <= len(train_y):
            raise UsageError(f"--train-size {train_size}: {name} has {len(train_y)} training images besides the "
                             f"validation holdout; give {s.num_classes} to {len(train_y)}")
        _, subset = stratified_split(train_y, int(train_size))
        train_x, train_y = train_x[subset], train_y[subset]
    return Dataset(name, train_x, train_y, val_x, val_y, s.test_x, s.test_y, s.num_classes,
                   tuple(s.train_x.shape[1:]), s.hflip, s.crop_pad, s.classes)


def to_float(x: Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1]; float images pass through (as float32)."""
    return x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x.to(torch.float32)


# ----------------------------------------------------------------------------- loaders

def _cifar(cls_name: str, folder: str, files: str, data_dir: Path, download: bool) -> _Splits:
    """Read CIFAR-10/100 (the python-pickle release) through torchvision."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    pretty = cls_name.replace("CIFAR", "CIFAR-")
    where = f"expected {data_dir / folder}/ with {files} (the python version from https://www.cs.toronto.edu/~kriz/cifar.html)"
    listed = cls.train_list + cls.test_list  # (name, md5) of the data files

    def present(root: Path) -> bool:
        return all((root / f).is_file() for f, _ in listed)

    if not present(data_dir / folder):
        if not download:
            raise UsageError(f"{pretty} not found in --data-dir {data_dir}: {where}; or allow downloading (--download)")
        downloads.fetch(cls.url, cls.tgz_md5, data_dir, folder, what=pretty, hint=where, complete=present,
                        file_md5s=[*listed, (cls.meta["filename"], cls.meta["md5"])])
    try:
        train, test = (cls(root=str(data_dir), train=t, download=False) for t in (True, False))
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        raise UsageError(f"{pretty} files in --data-dir {data_dir} are unreadable or fail torchvision's md5 check "
                         f"({first_line(exc)}); delete {data_dir / folder} and download it again") from None

    def images(ds) -> Tensor:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)

    return _Splits(images(train), torch.tensor(train.targets, dtype=torch.int64),
                   images(test), torch.tensor(test.targets, dtype=torch.int64),
                   len(train.classes), hflip=True, crop_pad=4)


@register("cifar10", 10, (3, 32, 32), **CIFAR_DEFAULTS)
def load_cifar10(data_dir: Path, download: bool) -> _Splits:
    return _cifar("CIFAR10", "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta", data_dir, download)


@register("cifar100", 100, (3, 32, 32), **CIFAR_DEFAULTS)
def load_cifar100(data_dir: Path, download: bool) -> _Splits:
    return _cifar("CIFAR100", "cifar-100-python", "train, test, meta", data_dir, download)


TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


@register("tinyimagenet", 200, (3, 64, 64), eps=8 / 255, step_size=2 / 255, epochs=100, batch_size=128, lr=0.1,
          lr_milestones=[50, 75])
def load_tinyimagenet(data_dir: Path, download: bool) -> _Splits:
    """The official ``tiny-imagenet-200`` folder; its labelled ``val`` split serves as the test split.

    Class indices follow the sorted wnids (as torchvision's ImageFolder numbers them), so teachers
    trained with ImageFolder load with matching outputs. Grayscale images are converted to RGB.
    """
    root = data_dir / "tiny-imagenet-200"
    layout = "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"

    def present(folder: Path) -> bool:
        return (folder / "wnids.txt").is_file()

    if not present(root):
        if not download:
            raise UsageError(f"TinyImageNet not found in --data-dir {data_dir}: expected {root}/ with {layout} "
                             f"(unzip {TINY_URL}); or allow downloading (--download)")
        downloads.fetch(TINY_URL, TINY_MD5, data_dir, root.name, what="TinyImageNet", complete=present,
                        hint=f"unzip {TINY_URL} there so that {root}/ holds {layout}")
    wnids = sorted((root / "wnids.txt").read_text().split())
    label = {w: i for i, w in enumerate(wnids)}
    train_files = [(p, label[w]) for w in wnids for p in sorted((root / "train" / w / "images").glob("*.JPEG"))]
    try:
        rows = [line.split("\t")[:2] for line in (root / "val" / "val_annotations.txt").read_text().splitlines()
                if line.strip()]
        val_files = [(root / "val" / "images" / f, label[w]) for f, w in rows]
    except (OSError, KeyError, ValueError) as exc:
        raise UsageError(f"TinyImageNet in {root} has a missing or malformed val/val_annotations.txt "
                         f"({first_line(exc)}); expected tab-separated lines: filename, wnid, bbox") from None
    if not train_files or not val_files:
        raise UsageError(f"TinyImageNet in {root} has no training or validation images; expected {layout}")
    train_x, train_y = _read_images(train_files)
    test_x, test_y = _read_images(val_files)
    return _Splits(train_x, train_y, test_x, test_y, len(wnids), hflip=True, crop_pad=4)


def _read_images(files: list[tuple[Path, int]]) -> tuple[Tensor, Tensor]:
    """Decode JPEGs into a uint8 (N, 3, H, W) tensor; all images must share the first one's size."""
    from PIL import Image

    arrays = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except OSError as exc:
            raise UsageError(f"cannot read image {path}: {first_line(exc)}") from None
        if arrays[-1].shape != arrays[0].shape:
            raise UsageError(f"image {path} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]}, "
                             f"but {files[0][0]} is {arrays[0].shape[1]}x{arrays[0].shape[0]}")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([c for _, c in files], dtype=torch.int64)


@register("digits", 10, (1, 8, 8), eps=0.1, step_size=0.025, epochs=15, batch_size=64, lr=0.05,
          lr_milestones=[10, 13], student="small_cnn")
def load_digits(data_dir: Path, download: bool) -> _Splits:
    """scikit-learn's 1797 8x8 handwritten digits (bundled, no download), values 0..16 scaled to [0, 1].

    A fixed stratified 25% test split. No flips (digits are not mirror-symmetric); crops pad 1 pixel,
    which on 8x8 shifts as much (1/8 of the side) as the usual 4 pixels on 32x32.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = stratified_split(y, int(0.25 * len(y)))
    return _Splits(x[train], y[train], x[test], y[test], 10, hflip=False, crop_pad=1)


@register("synthetic", None, None, eps=8 / 255, step_size=2 / 255, epochs=5, batch_size=64, lr=0.05,
          lr_milestones=[3, 4], student="small_cnn")
def load_synthetic(data_dir: Path, download: bool, shape=(3, 32, 32), num_classes: int = 10,
                   n_train: int = 2000, n_test: int = 500, seed: int = 0) -> _Splits:
    """A learnable toy problem of any shape: per-class smooth random prototypes plus pixel noise, in [0, 1].

    Deterministic given ``seed`` (its own seed, not the run seed). ``shape`` is (C, H, W) or "CxHxW".
    Crops pad min(4, H // 8) pixels (4 at 32x32, 1 at 8x8).
    """
    if isinstance(shape, str):
        shape = shape.lower().replace(",", "x").split("x")
    try:
        c, h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise UsageError(f"synthetic shape must be C,H,W (e.g. 3x32x32), not {shape}") from None
    if min(c, h, w) < 1 or int(num_classes) < 2 or int(n_train) < 1 or int(n_test) < 1:
        raise UsageError(f"synthetic needs a positive shape, n_train and n_test and at least 2 classes; got "
                         f"shape={c}x{h}x{w}, num_classes={num_classes}, n_train={n_train}, n_test={n_test}")
    g = torch.Generator().manual_seed(int(seed))
    coarse = torch.rand(int(num_classes), c, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, int(num_classes), (n,), generator=g)
        x = protos[y] + 0.15 * torch.randn(n, c, h, w, generator=g)
        return x.clamp_(0, 1), y

    train_x, train_y = sample(int(n_train))
    test_x, test_y = sample(int(n_test))
    return _Splits(train_x, train_y, test_x, test_y, int(num_classes), hflip=True, crop_pad=min(4, h // 8))


def _user_data(name: str) -> DatasetSpec:
    from .userdata import spec

    return spec(name)


DATASETS.resolve_prefix("folder", "folder:PATH", _user_data)
DATASETS.resolve_prefix("npz", "npz:PATH", _user_data)


# ----------------------------------------------------------------------------- augmentation and batching

def augment_batch(x: Tensor, *, crop_pad: int, hflip: bool, generator: torch.Generator | None) -> Tensor:
    """Random crop after zero-padding ``crop_pad`` pixels and, if ``hflip``, a horizontal flip with p=0.5.

    One gather over the whole batch on x's device; the random draws come from ``generator`` (on its
    own device, CPU by default) so results do not depend on where x lives.
    """
    if crop_pad <= 0 and not hflip:
        return x
    n, _, h, w = x.shape
    gen_device = generator.device if generator is not None else "cpu"
    # host-to-device copies without a stream sync (non_blocking: the draws are staged at once)
    dy, dx = torch.randint(0, 2 * crop_pad + 1, (2, n, 1), generator=generator, device=gen_device).to(x.device, non_blocking=True)
    rows = dy + torch.arange(h, device=x.device)  # (n, h) rows of the padded image
    cols = dx + torch.arange(w, device=x.device)  # (n, w)
    if hflip:
        flip = torch.rand(n, 1, generator=generator, device=gen_device).to(x.device, non_blocking=True) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
    padded = F.pad(x, (crop_pad,) * 4) if crop_pad > 0 else x
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _seeded(*ints: int) -> torch.Generator:
    """A CPU generator seeded by a well-mixed hash of ``ints``."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1)[0]))


def shard_indices(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """DistributedSampler semantics: permute by (seed, epoch), pad by wrapping around to a multiple of
    ``world_size``, and give rank r the indices r, r + world_size, ..."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    order = torch.randperm(n, generator=_seeded(0, seed, epoch)) if shuffle else torch.arange(n)
    total = -(-n // world_size) * world_size
    if total > n:
        order = torch.cat([order] * (-(-total // n)))[:total] if n else order
    return order[rank::world_size]


def iterate_batches(x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
                    rank: int = 0, world_size: int = 1, drop_last: bool = False, augment: bool = False,
                    crop_pad: int = 0, hflip: bool = False, device="cpu") -> Iterator[tuple[Tensor, Tensor]]:
    """Yield this rank's ``(images, labels)`` batches: float32 [0, 1] images and int64 labels on ``device``.

    Sharding follows ``shard_indices``; augmentation (train only: pass ``augment=False`` for val/test)
    draws from a generator seeded by (seed, epoch, rank), so an epoch is reproducible on resume.
    Only each batch is moved to ``device``; tensors already there are indexed in place, with the
    epoch's indices moved to them once (no host copy, so no wait for the device, per batch).
    """
    idx = shard_indices(len(x), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    idx_x = idx.to(x.device)
    idx_y = idx_x if y.device == x.device else idx.to(y.device)
    gen = _seeded(1, seed, epoch, rank) if augment else None
    stop = len(idx) - len(idx) % batch_size if drop_last else len(idx)
    for start in range(0, stop, batch_size):
        xb = to_float(x[idx_x[start:start + batch_size]].to(device, non_blocking=True))
        yb = y[idx_y[start:start + batch_size]].to(device, non_blocking=True)
        if augment:
            xb = augment_batch(xb, crop_pad=crop_pad, hflip=hflip, generator=gen)
        yield xb, yb


# MNIST and Fashion-MNIST live in their own module, which registers them (into dataspec's registry)
from . import mnist  # noqa: E402

LOADERS = (mnist,)  # the modules whose datasets are registered besides this one
