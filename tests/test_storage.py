"""raydistill.storage against a real S3-protocol server (moto's, on 127.0.0.1) and local folders: locations,
retention, cached copies that are complete or absent, one copy per node of a remote folder, and one-line errors."""
from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from cluster import S3Server
from conftest import assert_one_error_line, cli
from raydistill import storage
from raydistill.errors import UsageError


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def put(s3: S3Server, key: str, data: bytes) -> None:
    with s3.filesystem().open_output_stream(f"{s3.bucket}/{key}") as f:
        f.write(data)


def test_locations_keep_their_scheme(monkeypatch, tmp_path):
    monkeypatch.delenv("RAYDISTILL_STORAGE", raising=False)
    assert storage.root("s3://b/runs/") == "s3://b/runs"
    assert storage.root(str(tmp_path / "x" / "..")) == str(tmp_path)
    assert storage.root(None).endswith("ray_results")
    monkeypatch.setenv("RAYDISTILL_STORAGE", "gs://bucket/r")
    assert storage.root(None) == "gs://bucket/r"
    assert storage.join("s3://b/runs", "name", "/trials/") == "s3://b/runs/name/trials"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    # Ray and pyarrow give paths inside the filesystem: the scheme comes back from the root
    assert storage.uri_of("s3://b/runs", "b/runs/n/checkpoint_000002") == "s3://b/runs/n/checkpoint_000002"
    assert storage.uri_of("/tmp/runs", "/tmp/runs/n") == "/tmp/runs/n"
    assert not storage.is_remote("/a/b") and not storage.is_remote("file:///a") and storage.is_remote("gs://a")


def test_retention_keeps_exactly_the_newest_checkpoint_folders(s3, tmp_path):
    for n in (1, 2, 3, 12):
        put(s3, f"runs/r/checkpoint_{n:06d}/model.pt", b"x")
    put(s3, "runs/r/checkpoint_2026-12-01_00-00-00.000000/model.pt", b"x")  # Ray's own name: not ours to prune
    deleted = storage.prune_checkpoints(s3.uri("runs", "r"))
    assert [d.rsplit("/", 1)[-1] for d in deleted] == ["checkpoint_000001", "checkpoint_000002"]
    assert s3.listdir("runs", "r") == ["checkpoint_000003", "checkpoint_000012", "checkpoint_2026-12-01_00-00-00.000000"]
    for n in (4, 5, 6):
        (tmp_path / "r" / f"checkpoint_{n:06d}").mkdir(parents=True)
    storage.prune_checkpoints(str(tmp_path / "r"))
    assert sorted(os.listdir(tmp_path / "r")) == ["checkpoint_000005", "checkpoint_000006"]


def test_a_remote_file_is_copied_once_and_again_when_it_changes(s3, cache):
    put(s3, "c/model.pt", b"one")
    first = storage.local_copy(s3.uri("c", "model.pt"))
    assert first.read_bytes() == b"one" and str(first).startswith(str(cache))
    assert storage.local_copy(s3.uri("c", "model.pt")) == first
    put(s3, "c/model.pt", b"two!")
    second = storage.local_copy(s3.uri("c", "model.pt"))
    assert second != first and second.read_bytes() == b"two!"
    assert not list(cache.rglob(".partial-*")), "a temporary copy was left behind"
    with pytest.raises(UsageError, match="does not exist"):
        storage.local_copy(s3.uri("c", "missing.pt"), "checkpoint")


def _mirror(uri: str, q) -> None:
    q.put(str(storage.node_mirror(uri)))


def test_a_remote_folder_is_mirrored_once_per_node_by_concurrent_processes(s3, cache):
    for i in range(20):
        put(s3, f"data/set/part{i}.bin", os.urandom(50_000))
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_mirror, args=(s3.uri("data", "set"), q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    paths = {q.get(timeout=5) for _ in procs}
    assert len(paths) == 1
    local = paths.pop()
    assert sorted(os.listdir(local)) == sorted([".complete"] + [f"part{i}.bin" for i in range(20)])
    assert len([p for p in (cache / "data").iterdir() if p.is_dir()]) == 1, "copied more than once"


def test_checkpoint_files_load_from_the_bucket_and_missing_ones_are_one_line(s3, tmp_path):
    from raydistill.checkpoint import MODEL_FILE, load_model, save_model
    from raydistill.models import build_model

    model = build_model("small_cnn", 10, (1, 8, 8))
    save_model(tmp_path / "ck", model, "small_cnn", 10, (1, 8, 8), {"dataset": "digits", "eps": 0.1})
    storage.upload(tmp_path / "ck", s3.uri("ck"))
    loaded, meta = load_model(s3.uri("ck"))  # a folder: its model.pt
    assert meta["dataset"] == "digits"
    for (k, v), (_, w) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(v, w), k
    assert storage.exists(s3.uri("ck", MODEL_FILE))
    proc = cli("evaluate", s3.uri("nothing-here"), env=s3.env, timeout=120)
    assert_one_error_line(proc, "s3://raydistill/nothing-here", "does not exist")


def test_an_unreachable_endpoint_is_one_line(tmp_path):
    proc = cli("evaluate", "s3://bucket/ck", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                                                  "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                                                  "AWS_EC2_METADATA_DISABLED": "true"}, timeout=300)
    assert_one_error_line(proc, "s3://bucket/ck", "AWS_ENDPOINT_URL")


def test_in_process_runs_refuse_remote_storage(tmp_path):
    proc = cli("train", "pgd_at", "--workers", "0", "--storage-path", "s3://b/runs", "--tracking-uri", "none")
    assert_one_error_line(proc, "--workers 0", "local")
