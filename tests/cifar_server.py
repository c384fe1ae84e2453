"""CIFAR-10 in its exact on-disk format, written small, and served as the official archive is: a real HTTP
server on 127.0.0.1 that counts the requests for it.

* ``write_cifar10(root)``: ``root/cifar-10-batches-py/`` with data_batch_1..5, test_batch and batches.meta,
  the Python 2 pickles of the official release (few images each).
* ``make_archive(root)``: ``cifar-10-python.tar.gz`` holding that folder, and the md5 sums of it and its files.
* ``ArchiveServer``: serves the archive, half of it, then (after ``pause`` seconds: a download that takes
  time) the rest; ``mode`` ``"cut"`` drops the connection after the first half (a download cut off half-way),
  ``"stall"`` waits there until ``release()``, then sends the rest. ``downloads`` counts the GET requests, less
  torchvision's redirect probes (a GET with a ``Method: HEAD`` header, answered with the headers alone).
* ``CifarFrom``: a loop hook (raydistill.engine.Hooks) that carries the server's URL and the md5 sums; when it
  is unpickled (in the driver and in every Ray worker, tests/ being on their PYTHONPATH) it points
  torchvision's CIFAR10 at them, so ``--download`` fetches the test archive and its md5 checks pass.
"""
from __future__ import annotations

import hashlib
import pickle
import struct
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

FOLDER, ARCHIVE = "cifar-10-batches-py", "cifar-10-python.tar.gz"
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- the official pickle format
class _Py2Str(bytes):
    """A Python 2 ``str``, as the official CIFAR pickles hold their keys and label names."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us emit Python 2 string opcodes
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2str(self, obj):
        raw = bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _py2(obj):
    if isinstance(obj, str):
        return _Py2Str(obj.encode("latin1"))
    if isinstance(obj, dict):
        return {_py2(k): _py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_py2(v) for v in obj]
    return obj


def dump_py2(path, obj):
    with open(path, "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump(_py2(obj))


def images(labels, offset):
    """(N, 3072) uint8 rows in CIFAR order (1024 red, 1024 green, 1024 blue; each 32x32 row-major).

    Image i: red = its label, green = offset + i, blue = 7, and pixel (row 0, col 5) of red is 255.
    """
    n = len(labels)
    data = np.empty((n, 3, 1024), dtype=np.uint8)
    data[:, 0] = np.asarray(labels)[:, None]
    data[:, 1] = (offset + np.arange(n))[:, None]
    data[:, 2] = 7
    data[:, 0, 5] = 255
    return data.reshape(n, 3072)


def write_cifar10(root, per_batch=6, n_test=10) -> Path:
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True)
    for b in range(1, 6):
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        dump_py2(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "labels": labels,
                                              "data": images(labels, 10 * b), "filenames": [f"f{i}.png" for i in labels]})
    labels = [i % 10 for i in range(n_test)]
    dump_py2(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": labels,
                                     "data": images(labels, 200), "filenames": ["t.png"] * n_test})
    dump_py2(folder / "batches.meta", {"num_cases_per_batch": per_batch, "num_vis": 3072, "label_names": LABEL_NAMES})
    return folder


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def make_archive(root, per_batch=20, n_test=20) -> tuple[Path, dict]:
    """``root/cifar-10-python.tar.gz`` as the official one is laid out, and {name: md5} of the archive
    (``ARCHIVE``) and of each file in it."""
    src = Path(root) / "src"
    folder = write_cifar10(src, per_batch, n_test)
    sums = {f.name: md5(f) for f in folder.iterdir()}
    archive = Path(root) / ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=FOLDER)
    sums[ARCHIVE] = md5(archive)
    return archive, sums


# ----------------------------------------------------------------------------- the server
class ArchiveServer:
    """Serves ``archive`` at ``url`` from a thread (see the module's docstring)."""

    def __init__(self, archive: Path, mode: str = "whole", pause: float = 0.0):
        self.data, self.name, self.mode, self.pause = Path(archive).read_bytes(), Path(archive).name, mode, pause
        self.downloads = 0
        self.lock, self.go, self.sent_half = threading.Lock(), threading.Event(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self._headers()

            def do_GET(self):
                if not self._headers() or self.headers.get("Method") == "HEAD":
                    return
                with server.lock:
                    server.downloads += 1
                half = len(server.data) // 2
                self.wfile.write(server.data[:half])
                self.wfile.flush()
                server.sent_half.set()
                if server.mode == "cut":
                    self.close_connection = True
                    return
                if server.mode == "stall":
                    server.go.wait(300)
                time.sleep(server.pause)
                self.wfile.write(server.data[half:])

            def _headers(self) -> bool:
                if self.path != f"/{server.name}":
                    self.send_error(404)
                    return False
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(server.data)))
                self.end_headers()
                return True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{self.name}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.go.set()

    def stop(self) -> None:
        self.go.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------- the hook that carries it
def point_torchvision_at(url: str, sums: dict, setattr=setattr) -> None:
    """torchvision's CIFAR10 downloads ``url`` and checks the md5 sums ``sums`` (make_archive's); in a test's
    own process pass ``monkeypatch.setattr``, so that the official values come back after it."""
    from torchvision.datasets import CIFAR10

    setattr(CIFAR10, "url", url)
    setattr(CIFAR10, "tgz_md5", sums[ARCHIVE])
    setattr(CIFAR10, "train_list", [[name, sums[name]] for name, _ in CIFAR10.train_list])
    setattr(CIFAR10, "test_list", [[name, sums[name]] for name, _ in CIFAR10.test_list])
    setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": sums[CIFAR10.meta["filename"]]})


def _unpickled(url: str, sums: dict) -> "CifarFrom":
    point_torchvision_at(url, sums)
    return CifarFrom(url, sums)


class CifarFrom:
    """A loop hook whose unpickling points torchvision's CIFAR10 at ``url`` and the md5 sums ``sums``."""

    def __init__(self, url: str, sums: dict):
        self.url, self.sums = url, dict(sums)

    def __reduce__(self):
        return _unpickled, (self.url, self.sums)

    def on_end(self, trainer) -> None:  # a hook needs one hook point; this one has nothing to do there
        pass
