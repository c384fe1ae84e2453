"""Where runs, checkpoints and data live: a local folder or a URI of any filesystem pyarrow knows
(``s3://BUCKET/PATH``, ``gs://BUCKET/PATH``, ...). The one module that talks to those filesystems.

Endpoint and credentials come from the standard environment variables of each store (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``; ``GOOGLE_APPLICATION_CREDENTIALS``),
read by pyarrow's own clients. On a Ray cluster they must be in the environment of ``ray start`` on every
node: the training workers take that environment, not the driver's (docs/clusters.md).

Remote files are read through a local cache (``RAYDISTILL_CACHE``, default ``~/.cache/raydistill``): a
checkpoint is downloaded once per machine (keyed by its URI, size and modification time), a remote
``--data-dir`` copied once per node under a lock; nothing half-copied is ever taken for complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UsageError, first_line

CHECKPOINT_DIR = re.compile(r"checkpoint_(\d{6})")  # checkpoint_NNNNNN: the epochs it holds
KEEP_CHECKPOINTS = 2
# A folder of Ray's temporary files: TEMP_DIR/session_DATE_TIME_MICROS_PID (or its link session_latest). A job of
# `ray job submit --working-dir` runs in a copy of its working directory under it (runtime_resources/
# working_dir_files/...), deleted when Ray cleans its temporary files.
RAY_SESSION_DIR = re.compile(r"session_(latest|\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_\d+)")
ENV_HINT = ("endpoint and credentials come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
            "(S3) or GOOGLE_APPLICATION_CREDENTIALS (GCS)")


def is_remote(path: str | os.PathLike | None) -> bool:
    """A URI with a scheme other than file:// (s3://, gs://, ...)."""
    return path is not None and "://" in str(path) and not str(path).startswith("file://")


def root(path: str | None) -> str:
    """Where runs and checkpoints live: ``path``, else $RAYDISTILL_STORAGE, else ~/ray_results; a local
    folder comes back absolute, a URI as given (without a trailing slash)."""
    path = path or os.environ.get("RAYDISTILL_STORAGE") or os.path.join(Path.home(), "ray_results")
    if str(path).startswith("file://"):
        path = str(path)[len("file://"):]
    return str(path).rstrip("/") if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def in_ray_session(path: str | os.PathLike) -> bool:
    """Whether local ``path`` lies inside a Ray session's temporary folder (deleted when Ray cleans it)."""
    return any(RAY_SESSION_DIR.fullmatch(part) for part in os.path.realpath(path).split(os.sep))


def join(base: str, *parts: str) -> str:
    """``base``/``parts`` for a folder or a URI."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def uri_of(base: str, fs_path: str) -> str:
    """The full location of ``fs_path`` (a path inside the filesystem of ``base``, e.g. the ``bucket/key``
    that Ray and pyarrow give) with ``base``'s scheme: ``s3://bucket/key``; local paths stay paths."""
    if not is_remote(base) or is_remote(fs_path):
        return str(fs_path)
    return f"{base.split('://', 1)[0]}://{str(fs_path).lstrip('/')}"


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) of a URI or local path; a bad URI is a one-line UsageError."""
    from pyarrow import fs

    if not is_remote(uri):
        return fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(str(uri)))
    try:
        return fs.FileSystem.from_uri(str(uri))
    except Exception as exc:  # ArrowInvalid for an unknown scheme, OSError for missing credentials
        raise UsageError(f"storage '{uri}' cannot be opened: {first_line(exc)}; {ENV_HINT}") from None


def _call(uri: str, fn, *args):
    """``fn(*args)`` on the filesystem of ``uri``; any storage failure is a one-line UsageError."""
    try:
        return fn(*args)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UsageError(f"storage '{uri}' could not be read: {first_line(exc)}; {ENV_HINT}") from None


def info(uri: str):
    from pyarrow.fs import FileType

    fs_, path = filesystem(uri)
    i = _call(uri, fs_.get_file_info, path)
    return None if i.type == FileType.NotFound else i


def exists(uri: str) -> bool:
    return info(uri) is not None


def is_dir(uri: str) -> bool:
    from pyarrow.fs import FileType

    i = info(uri)
    return i is not None and i.type == FileType.Directory


def list_dir(uri: str) -> list[tuple[str, bool]]:
    """(name, is a folder) of each entry of folder ``uri`` (none when it does not exist)."""
    from pyarrow.fs import FileSelector, FileType

    fs_, path = filesystem(uri)
    infos = _call(uri, fs_.get_file_info, FileSelector(path, allow_not_found=True))
    return sorted((i.base_name, i.type == FileType.Directory) for i in infos)


def read_bytes(uri: str) -> bytes:
    """The whole file ``uri`` (any filesystem); FileNotFoundError when it is not there."""
    fs_, path = filesystem(uri)

    def read() -> bytes:
        with fs_.open_input_stream(path) as fh:
            return fh.read()
    return _call(uri, read)


def write_bytes(uri: str, data: bytes) -> None:
    """Write the file ``uri`` whole: readers see all of it or none (a local file is written beside and renamed
    into place; an object store's PUT is whole). Its folder is created."""
    fs_, path = filesystem(uri)
    if is_remote(uri):
        _call(uri, lambda: fs_.create_dir(path.rsplit("/", 1)[0], recursive=True))

        def put() -> None:
            with fs_.open_output_stream(path) as fh:
                fh.write(data)
        _call(uri, put)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def delete_dir(uri: str) -> None:
    fs_, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        _call(uri, fs_.delete_dir, path)


def checkpoint_dirs(run_uri: str) -> list[tuple[int, str]]:
    """(epochs, location) of every ``checkpoint_NNNNNN`` folder of a run, oldest first."""
    out = []
    for name, folder in list_dir(run_uri):
        m = CHECKPOINT_DIR.fullmatch(name)
        if folder and m:
            out.append((int(m.group(1)), join(run_uri, name)))
    return sorted(out)


def prune_checkpoints(run_uri: str, keep: int = KEEP_CHECKPOINTS) -> list[str]:
    """Delete all but the newest ``keep`` checkpoint folders of a run (also those Ray never registered,
    which its own retention does not see); returns the deleted locations."""
    old = [loc for _, loc in checkpoint_dirs(run_uri)][:-keep] if keep > 0 else []
    for loc in old:
        delete_dir(loc)
    return old


# ----------------------------------------------------------------------------- local copies
def cache_dir() -> Path:
    return Path(os.environ.get("RAYDISTILL_CACHE") or Path.home() / ".cache" / "raydistill").expanduser()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) between processes of one machine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download(fs_, src: str, dest: Path) -> None:
    """Copy file or folder ``src`` of ``fs_`` to the local path ``dest`` (which must not exist)."""
    from pyarrow import fs as pafs

    i = fs_.get_file_info(src)
    if i.type == pafs.FileType.Directory:
        dest.mkdir(parents=True)
        pafs.copy_files(src, str(dest), source_filesystem=fs_, destination_filesystem=pafs.LocalFileSystem())
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs_.open_input_stream(src) as inp, open(dest, "wb") as out:
            shutil.copyfileobj(inp, out, 1 << 20)


def local_copy(uri: str | os.PathLike, what: str = "file") -> Path:
    """A local path holding the file or folder ``uri``: the path itself when it is local, else a copy in
    the cache, made once (under a lock; complete or absent) and reused while the remote one is unchanged.
    A missing remote location is a one-line UsageError naming ``what``."""
    if not is_remote(uri):
        return Path(os.path.expanduser(str(uri)))
    uri = str(uri).rstrip("/")
    i = info(uri)
    if i is None:
        raise UsageError(f"{what} '{uri}' does not exist")
    fs_, path = filesystem(uri)
    key = hashlib.sha256(f"{uri}|{i.size}|{i.mtime_ns}".encode()).hexdigest()[:20]
    dest = cache_dir() / "remote" / key / Path(path).name
    if dest.exists():
        return dest
    with file_lock(dest.parent.with_suffix(".lock")):
        if not dest.exists():
            tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=dest.parent.parent))
            try:
                _call(uri, _download, fs_, path, tmp / dest.name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / dest.name, dest)  # complete, or not there at all
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def node_mirror(uri: str, what: str = "--data-dir") -> Path:
    """A local copy of folder ``uri`` on this node, made once per node: the first process copies it (under
    a lock, then renames it into place), the others wait and reuse it. A local ``uri`` comes back as is."""
    if not is_remote(uri):
        return Path(uri)
    uri = uri.rstrip("/")
    dest = cache_dir() / "data" / hashlib.sha256(uri.encode()).hexdigest()[:20]
    done = dest / ".complete"
    if done.exists():
        return dest
    with file_lock(dest.with_suffix(".lock")):
        if not done.exists():
            if not is_dir(uri):
                raise UsageError(f"{what} '{uri}' is not a folder in the storage")
            fs_, path = filesystem(uri)
            tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=dest.parent))
            try:
                _call(uri, _download, fs_, path, tmp / "files")
                (tmp / "files" / ".complete").write_text(uri + "\n")
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp / "files", dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def upload(local: str | os.PathLike, uri: str) -> None:
    """Copy the local file or folder ``local`` to ``uri`` (any filesystem)."""
    from pyarrow import fs as pafs

    fs_, path = filesystem(uri)
    if Path(local).is_dir():
        _call(uri, fs_.create_dir, path)
        _call(uri, pafs.copy_files, str(local), path, pafs.LocalFileSystem(), fs_)
    else:
        _call(uri, pafs.copy_files, str(local), path, pafs.LocalFileSystem(), fs_)


# ----------------------------------------------------------------------------- a Ray cluster's nodes
# The variables that point pyarrow's clients at a store (endpoint, credentials, region). Ray's workers take them
# from the environment of `ray start` on their node, never from the driver's shell.
STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")


def check_nodes_reach(uri: str, nodes: list[dict]) -> None:
    """Open remote storage ``uri`` here and on each of the Ray cluster's ``nodes`` (ray.nodes() entries), as their
    workers will. A store that this process cannot open, or that a node cannot (its client's error, or the bucket
    missing there), is a one-line UsageError; for the nodes, naming the STORE_ENV variables that they lack or have
    with another value than this process (compared by digest: no value leaves its node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    problem, here = _probe(uri)
    if problem:
        raise UsageError(f"storage '{uri}' cannot be opened: {problem}; {ENV_HINT}")
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    try:
        results = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                           .remote(uri) for n in nodes])
    except ray.exceptions.RayError:  # the probe could not run (a node lost meanwhile, another raydistill there)
        return
    bad = [(n["NodeManagerAddress"], problem, there) for n, (problem, there) in zip(nodes, results) if problem]
    if bad:
        address, problem, there = bad[0]
        names = [k for k in STORE_ENV if k in here and there.get(k) != here[k]]
        raise UsageError(
            f"storage '{uri}' cannot be opened from {len(bad)} of the cluster's {len(nodes)} nodes ({address}: {problem}); "
            "Ray's workers take the environment of `ray start`, not this shell's"
            + (f"; there {', '.join(names)} {'is' if len(names) == 1 else 'are'} missing or set otherwise than here"
               if names else "")
            + ": set the storage endpoint and credentials in that environment on every node (docs/clusters.md)")


def _probe(uri: str) -> tuple[str | None, dict[str, str]]:
    """In this process: (why ``uri`` cannot be used here: its client's error, or its bucket missing; else None),
    and the digests of the STORE_ENV variables set here."""
    from pyarrow import fs

    digests = {k: hashlib.sha256(os.environ[k].encode()).hexdigest() for k in STORE_ENV if k in os.environ}
    try:
        fs_, path = fs.FileSystem.from_uri(uri)
        bucket = path.strip("/").split("/")[0]
        if fs_.get_file_info(bucket).type == fs.FileType.NotFound:
            return f"bucket '{bucket}' not found", digests
    except Exception as exc:  # ArrowInvalid, OSError: whatever the store's client raises
        return first_line(exc), digests
    return None, digests
