"""Data without code: ``--dataset folder:PATH`` (class sub-folders of images) and ``--dataset npz:PATH`` (arrays).

The registry of datasets (``data.DATASETS``) resolves these names through :func:`spec`, so train, tune,
evaluate, study and bench take them wherever they take a dataset's name. The name is the data's identity:
the run's configuration holds it with the path made absolute (:func:`canonical`), checkpoints, MLflow and
a study's table record it, and ``evaluate CHECKPOINT`` reloads the data from it.

* ``folder:PATH``: the ImageFolder layout, ``PATH/train/<class>/*.png`` and ``PATH/test/<class>/...`` (the
  same class folders in both), or ``PATH/<class>/...`` with a held-out test split. Images: the files named
  ``*.png .jpg .jpeg .bmp .gif .tif .tiff .webp`` (any case) anywhere inside a class folder; other files and
  names starting with '.' are ignored. Classes are numbered in the sorted order of their folder names (as
  torchvision's ImageFolder does); the names are recorded (``Dataset.classes``, the checkpoint's meta). All
  images must have one size; 1 channel when every image is grayscale, else all are read as RGB (alpha
  dropped); 8 bits per channel, kept as uint8.
* ``npz:PATH``: a NumPy ``.npz`` (``numpy.savez``) holding ``x`` and ``y``, optionally ``x_test`` and
  ``y_test`` (together) and ``classes`` (the class names, strings). ``x``: uint8 0..255, or float in [0, 1];
  shaped (N, H, W) (grayscale), (N, H, W, C) (channels last: NumPy, PIL, TensorFlow) or (N, C, H, W) (channels
  first: PyTorch), C = 1 or 3: channels last when the last axis has 1 or 3 entries, else channels first.
  ``y``: integer labels 0..K-1, K = the number of ``classes`` if given, else the largest label + 1; every
  class must occur in ``y``; ``x_test`` has ``x``'s image shape.
* ``PATH`` is local (relative to the working folder, or to a study file's folder in a study) or an ``s3://``
  / ``gs://`` URI, which each node copies once (a folder as ``--data-dir`` is, ``storage.node_mirror``; an
  .npz through the cache, ``storage.local_copy``).
* Options after ``?``, comma-separated: ``test_fraction=F`` (default 0.2, in (0, 1); only for data without
  a test split) and ``hflip=true`` (random horizontal flips in training; default false: digits, letters and
  many other images are not mirror-symmetric), e.g. ``'folder:data/pets?test_fraction=0.1,hflip=true'``.
  Options change the data, so they are part of the name.

Without a test split, ``test_fraction`` of the images (rounded, stratified by class) is held out as the
test split, the same every time: its seed is fixed (``dataspec.HOLDOUT_SEED``), not the run's.

The threat model: the dataset layer's defaults are eps 8/255 and step size 2/255 (10 steps, the global
default), for images in [0, 1]. That is the convention of CIFAR-10/100 and TinyImageNet for 8-bit natural
images: eight of the 255 quantisation levels, a change the eye hardly sees. It need not suit other data
(scikit-learn's 16-level digits use 0.1): give ``--eps`` / ``--step-size`` (a study's ``threat``) for it.
Training augmentation: random crops after padding min(4, H // 8) pixels (4 at 32x32, as CIFAR's), and
flips only with ``hflip=true``.

Every problem is one UsageError line before anything is created: a missing path, a file where a folder is
expected or the reverse, an empty folder or class folder, one class only, unreadable images, mixed sizes,
train/ and test/ with different classes, wrong array names or dimensions, labels out of range, pixel values
outside the range, bad options. Looking a name up (:func:`spec`, once per process) reads what that needs and
no pixels: every image file's header (size and mode), the arrays' headers and labels, and a float ``x``'s
values in chunks (their range); the loader then reads the data.
"""
from __future__ import annotations

import functools
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import storage
from .dataspec import DatasetSpec, _Splits, stratified_split
from .errors import UsageError, first_line

KINDS = ("folder", "npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
NPZ_ARRAYS = ("x", "y", "x_test", "y_test", "classes")
TEST_FRACTION = 0.2
DEFAULTS = {"eps": 8 / 255, "step_size": 2 / 255}  # the dataset layer of the configuration (config.resolve)
OPTIONS = "test_fraction=F (0 < F < 1, default 0.2), hflip=true|false (default false)"


@dataclass(frozen=True)
class Name:
    """A parsed ``folder:`` / ``npz:`` name: its kind, its location (an absolute path or a URI), its options."""

    kind: str
    location: str
    test_fraction: float | None = None  # None: TEST_FRACTION where there is no test split
    hflip: bool = False

    def __str__(self) -> str:
        opts = ["hflip=true"] if self.hflip else []
        opts += [f"test_fraction={self.test_fraction:g}"] if self.test_fraction is not None else []
        return f"{self.kind}:{self.location}" + ("?" + ",".join(opts) if opts else "")

    def fail(self, problem: str) -> UsageError:
        return UsageError(f"dataset {self}: {problem}")


def is_user_data(name: str) -> bool:
    """Whether ``name`` is a ``folder:`` or ``npz:`` name (not a registered dataset's)."""
    return isinstance(name, str) and name.partition(":")[0] in KINDS and ":" in name


def parse(name: str, base: str | os.PathLike | None = None) -> Name:
    """``name`` parsed; a local path made absolute (``~`` expanded, relative to ``base``, default the working folder)."""
    kind, _, rest = name.partition(":")
    location, _, query = rest.partition("?")
    if not location:
        raise UsageError(f"dataset {name} names no path; e.g. {kind}:data/pets or {kind}:s3://bucket/pets")
    test_fraction, hflip = None, False
    for item in (i.strip() for i in query.split(",") if i.strip()):
        key, _, value = item.partition("=")
        if key == "test_fraction":
            try:
                test_fraction = float(value)
            except ValueError:
                test_fraction = float("nan")
            if not 0 < test_fraction < 1:
                raise UsageError(f"dataset {name}: test_fraction={value} must be a number between 0 and 1 (exclusive)")
        elif key == "hflip" and value.lower() in ("true", "false"):
            hflip = value.lower() == "true"
        else:
            raise UsageError(f"dataset {name}: unknown option '{item}'; accepted: {OPTIONS}")
    if not storage.is_remote(location):
        location = os.path.abspath(os.path.join(base or os.getcwd(), os.path.expanduser(location)))
    return Name(kind, location.rstrip("/") or "/", test_fraction, hflip)


def canonical(name: str, base: str | os.PathLike | None = None) -> str:
    """A ``folder:`` / ``npz:`` name with its path absolute and its options in order; any other name as it is."""
    return str(parse(name, base)) if is_user_data(name) else name


def label(name: str) -> str:
    """A short form of a dataset's name for run names: ``folder:/data/pets?hflip=true`` -> ``pets``,
    ``npz:s3://bucket/x.npz`` -> ``x``; other names as they are."""
    if not is_user_data(name):
        return name
    stem = Path(parse(name).location).name
    stem = stem[:-4] if stem.lower().endswith(".npz") else stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).lstrip(".") or name.partition(":")[0]


def spec(name: str) -> DatasetSpec:
    """The DatasetSpec of a ``folder:`` / ``npz:`` name (read once per process; raises UsageError)."""
    return _spec(canonical(name))


@functools.lru_cache(maxsize=16)
def _spec(name: str) -> DatasetSpec:
    n = parse(name)
    info = _scan_folder(n) if n.kind == "folder" else _scan_npz(n)
    c, h, w = info["shape"]

    def load(data_dir: Path, download: bool) -> _Splits:  # --data-dir and --download do not apply
        tx, ty, vx, vy = info["read"]()
        return _Splits(tx, ty, vx, vy, len(info["classes"]), hflip=n.hflip, crop_pad=min(4, h // 8),
                       classes=tuple(info["classes"]))

    return DatasetSpec(load, len(info["classes"]), (c, h, w), dict(DEFAULTS), sizes=info["sizes"])


def _held_out(n: Name, y: np.ndarray, has_test: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(train, test) indices of the fixed stratified test split, or None where the data has a test split."""
    if has_test:
        if n.test_fraction is not None:
            raise n.fail("test_fraction applies only to data without a test split (this one has its own)")
        return None
    fraction = TEST_FRACTION if n.test_fraction is None else n.test_fraction
    n_test = max(1, round(fraction * len(y)))
    try:
        keep, held = stratified_split(torch.from_numpy(y), n_test)
    except UsageError as exc:
        raise n.fail(f"{exc} (test_fraction={fraction:g} of {len(y)} images; give more images per class, "
                     f"or a test split)") from None
    return keep.numpy(), held.numpy()


# ----------------------------------------------------------------------------- folder:PATH
def _scan_folder(n: Name) -> dict:
    root = storage.node_mirror(n.location, what=f"dataset {n}") if storage.is_remote(n.location) else Path(n.location)
    if not root.exists():
        raise n.fail("no such folder")
    if not root.is_dir():
        raise n.fail("is a file, not a folder of class sub-folders (an .npz file is read by npz:PATH)")
    if (root / "train").is_dir() or (root / "test").is_dir():
        if not ((root / "train").is_dir() and (root / "test").is_dir()):
            raise n.fail("has one of train/ and test/ but not the other: give both (train/<class>/, test/<class>/), "
                         "or the class folders directly in it for a held-out test split")
        train, classes = _class_files(n, root / "train", "train/")
        test, test_classes = _class_files(n, root / "test", "test/")
        if test_classes != classes:
            raise n.fail(f"test/ has the class folders {', '.join(test_classes)} but train/ has {', '.join(classes)}; "
                         f"give both the same classes")
    else:
        train, classes = _class_files(n, root, "it")
        test = []
    files = train + test
    size, gray = _check_headers(n, root, files)
    shape = (1 if gray else 3, size[1], size[0])
    split = _held_out(n, np.array([c for _, c in train], dtype=np.int64), bool(test))

    def read() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, y = _decode(n, root, files, shape)
        if split is None:
            k = len(train)
            return x[:k], y[:k], x[k:], y[k:]
        keep, held = (torch.from_numpy(i) for i in split)
        return x[keep], y[keep], x[held], y[held]

    sizes = (len(train), len(test)) if split is None else (len(split[0]), len(split[1]))
    return {"shape": shape, "classes": classes, "read": read, "sizes": sizes}


def _visible(path: Path, top: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(top).parts)


def _class_files(n: Name, folder: Path, where: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image file, class index) of every image in ``folder``'s class sub-folders, and the class names."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    classes = [p.name for p in entries if p.is_dir()]
    loose = [p.name for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not classes:
        raise n.fail(f"{where} has no class folders (expected <class>/*.png, *.jpg, ...: one folder per class)")
    if loose:
        raise n.fail(f"{where} holds images outside the class folders ({loose[0]}): put each in its class's folder")
    if len(classes) < 2:
        raise n.fail(f"one class only ('{classes[0]}'): a classifier needs at least 2 class folders")
    files = []
    for index, cls in enumerate(classes):
        found = sorted(p for p in (folder / cls).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p, folder) and p.is_file())
        if not found:
            raise n.fail(f"class folder {folder / cls} holds no images ({' '.join(IMAGE_SUFFIXES)})")
        files += [(p, index) for p in found]
    return files, classes


def _check_headers(n: Name, root: Path, files: list[tuple[Path, int]]) -> tuple[tuple[int, int], bool]:
    """Every image's (width, height) and mode from its header: one size for all; whether all are grayscale."""
    from PIL import Image

    size, gray, first = None, True, None
    for path, _ in files:
        try:
            with Image.open(path) as im:
                this, mode = im.size, im.mode
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise n.fail(f"cannot read image {path.relative_to(root)}: {first_line(exc)}") from None
        if size is None:
            size, first = this, path
        elif this != size:
            raise n.fail(f"image {path.relative_to(root)} is {this[0]}x{this[1]} but {first.relative_to(root)} is "
                         f"{size[0]}x{size[1]}; all images must have one size (resize them first)")
        gray = gray and mode in GRAY_MODES
    return size, gray


def _decode(n: Name, root: Path, files: list[tuple[Path, int]], shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """The images as uint8 (N, C, H, W) ('L' or 'RGB') and their labels."""
    from PIL import Image

    c, h, w = shape
    x = np.empty((len(files), h, w, c), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as exc:
            raise n.fail(f"cannot read image {path.relative_to(root)}: {first_line(exc)}") from None
        if a.shape[:2] != (h, w):
            raise n.fail(f"image {path.relative_to(root)} is {a.shape[1]}x{a.shape[0]}, not {w}x{h}")
        x[i] = a.reshape(h, w, c)
    y = torch.tensor([cls for _, cls in files], dtype=torch.int64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y


# ----------------------------------------------------------------------------- npz:PATH
def _scan_npz(n: Name) -> dict:
    path = storage.local_copy(n.location, what=f"dataset {n}") if storage.is_remote(n.location) else Path(n.location)
    if not path.exists():
        raise n.fail("no such file")
    if path.is_dir():
        raise n.fail("is a folder, not an .npz file (a folder of class sub-folders is read by folder:PATH)")
    try:
        with zipfile.ZipFile(path) as z:
            heads = {m[:-4]: _npy_header(z, m) for m in z.namelist() if m.endswith(".npy")}
            others = [m for m in z.namelist() if not m.endswith(".npy")]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise n.fail(f"is not a readable .npz file (numpy.savez's zip of .npy arrays): {first_line(exc)}") from None
    unknown = sorted(set(heads) - set(NPZ_ARRAYS)) + others
    if unknown:
        raise n.fail(f"holds array '{unknown[0]}'; accepted arrays: x, y (required), x_test and y_test (together), classes")
    for required in ("x", "y"):
        if required not in heads:
            raise n.fail(f"has no array '{required}' (it has {', '.join(sorted(heads)) or 'none'}); "
                         f"accepted arrays: x, y (required), x_test and y_test (together), classes")
    if ("x_test" in heads) != ("y_test" in heads):
        raise n.fail("has one of x_test and y_test but not the other: give both, or neither for a held-out test split")
    shape = _image_shape(n, "x", *heads["x"])
    if "x_test" in heads:
        test_shape = _image_shape(n, "x_test", *heads["x_test"])
        if test_shape[1:] != shape[1:] or heads["x_test"][0][1:] != heads["x"][0][1:]:
            raise n.fail(f"x_test's images are {heads['x_test'][0][1:]}, x's are {heads['x'][0][1:]}; give both one shape")
    with np.load(path, allow_pickle=False) as arrays:
        try:
            y = _labels(n, "y", arrays["y"], heads["x"][0][0])
            y_test = _labels(n, "y_test", arrays["y_test"], heads["x_test"][0][0]) if "x_test" in heads else None
            names = _class_names(n, arrays["classes"]) if "classes" in heads else None
        except ValueError as exc:  # an object array (pickled): never loaded
            raise n.fail(f"holds an array that is not plain numbers or text: {first_line(exc)}") from None
    k = len(names) if names is not None else int(y.max()) + 1
    for label, lab in (("y", y), ("y_test", y_test)):
        if lab is not None and (lab.min() < 0 or lab.max() >= k):
            bad = int(lab.min()) if lab.min() < 0 else int(lab.max())
            raise n.fail(f"{label} holds label {bad}, out of range: labels are 0..{k - 1} "
                         f"({'the ' + str(k) + ' names in classes' if names is not None else 'classes counted from y'})")
    missing = sorted(set(range(k)) - set(np.unique(y).tolist()))
    if k < 2:
        raise n.fail("one class only (every label in y is 0): a classifier needs at least 2 classes")
    if missing:
        raise n.fail(f"class {missing[0]} has no sample in y; every class 0..{k - 1} must occur in the training labels")
    with zipfile.ZipFile(path) as z:
        for a in ("x", "x_test"):
            if a in heads and heads[a][1].kind == "f":
                _check_float_range(n, z, a, heads[a])
    split = _held_out(n, y, y_test is not None)
    layout = shape[0]

    def read() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with np.load(path, allow_pickle=False) as arrays:
            x = _to_nchw(arrays["x"], layout)
            if split is None:
                return x, torch.from_numpy(y), _to_nchw(arrays["x_test"], layout), torch.from_numpy(y_test)
        keep, held = (torch.from_numpy(i) for i in split)
        return x[keep], torch.from_numpy(y)[keep], x[held], torch.from_numpy(y)[held]

    sizes = (len(y), len(y_test)) if split is None else (len(split[0]), len(split[1]))
    return {"shape": shape[1:], "classes": names or [str(i) for i in range(k)], "read": read, "sizes": sizes}


def _npy_header(z: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one .npy inside the zip, from its header only."""
    with z.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return tuple(shape), dtype


def _image_shape(n: Name, name: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[str, int, int, int]:
    """(layout, C, H, W) of image array ``name``: layout 'nhw', 'nhwc' or 'nchw'."""
    if dtype != np.uint8 and dtype.kind != "f":
        raise n.fail(f"{name} is {dtype}; images are uint8 (0..255) or float (0..1)")
    if len(shape) == 3:
        layout, (c, h, w) = "nhw", (1, *shape[1:])
    elif len(shape) == 4 and shape[3] in (1, 3):
        layout, (h, w, c) = "nhwc", shape[1:]
    elif len(shape) == 4 and shape[1] in (1, 3):
        layout, (c, h, w) = "nchw", shape[1:]
    else:
        raise n.fail(f"{name} has shape {shape}; images are (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3")
    if min(shape) < 1:
        raise n.fail(f"{name} has shape {shape}: no images")
    return layout, c, h, w


def _labels(n: Name, name: str, y: np.ndarray, count: int) -> np.ndarray:
    if y.ndim != 1 or len(y) != count or not (np.issubdtype(y.dtype, np.integer) and y.dtype != bool):
        raise n.fail(f"{name} is {y.dtype} of shape {y.shape}; labels are integers, one per image ({count})")
    return y.astype(np.int64)


def _class_names(n: Name, names: np.ndarray) -> list[str]:
    if names.ndim != 1 or names.dtype.kind not in "US" or len(set(names.tolist())) != len(names):
        raise n.fail(f"classes is {names.dtype} of shape {names.shape}; give distinct class names (strings), one per class")
    return [str(s.decode() if isinstance(s, bytes) else s) for s in names.tolist()]


def _check_float_range(n: Name, z: zipfile.ZipFile, name: str, head: tuple) -> None:
    """A float image array's values lie in [0, 1] (read in chunks of 16M values)."""
    shape, dtype = head
    left, lo, hi = int(np.prod(shape)), np.inf, -np.inf
    with z.open(name + ".npy") as f:
        version = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        while left:
            a = np.frombuffer(f.read(min(left, 1 << 24) * dtype.itemsize), dtype=dtype)
            if not len(a):
                raise n.fail(f"{name} is truncated")
            if not np.isfinite(a).all():
                raise n.fail(f"{name} holds NaN or infinite values; float images are in [0, 1]")
            lo, hi, left = min(lo, float(a.min())), max(hi, float(a.max())), left - len(a)
    if lo < 0 or hi > 1:
        raise n.fail(f"{name} holds values from {lo:g} to {hi:g}; float images are in [0, 1] (or give uint8 0..255)")


def _to_nchw(x: np.ndarray, layout: str) -> Tensor:
    """uint8 stays uint8, floats become float32; (N, C, H, W)."""
    t = torch.from_numpy(np.ascontiguousarray(x if x.dtype == np.uint8 else x.astype(np.float32)))
    if layout == "nhw":
        return t[:, None].contiguous()
    return t.permute(0, 3, 1, 2).contiguous() if layout == "nhwc" else t
