"""Data on a cluster (issue 18): ``--download`` fetches a dataset once per node while the node's other workers
wait, a download cut off or killed is never taken for a dataset, and a remote ``--data-dir`` is copied once per
node. The archive is CIFAR-10's own (tests/cifar_server.py) served by a real HTTP server on 127.0.0.1; S3 is
moto's server (tests/cluster.py); Ray is the local instance that ``train`` starts (one node, 2 workers)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import raydistill.data
from cifar_server import FOLDER, ArchiveServer, CifarFrom, make_archive, md5, point_torchvision_at
from cluster import S3Server
from conftest import REPO, summary, train_with_hooks
from raydistill import storage
from raydistill.data import load_dataset
from raydistill.errors import UsageError

LOCK = ".raydistill-download.lock"
TRAIN = ["pgd_at", "--dataset", "cifar10", "--student", "small_cnn", "--epochs", "1", "--batch-size", "16",
         "--val-size", "10", "--attack-steps", "1", "--test-attacks", "clean", "--tracking-uri", "none"]


@pytest.fixture
def archive(tmp_path):
    """(path, md5 sums) of a CIFAR-10 archive with 100 training and 20 test images."""
    return make_archive(tmp_path / "archive")


@pytest.fixture
def serve(archive):
    servers = []

    def start(mode: str = "whole", pause: float = 0.0) -> ArchiveServer:
        servers.append(ArchiveServer(archive[0], mode, pause))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def loader_process(url: str, sums: dict, data: Path) -> subprocess.Popen:
    """A process that loads CIFAR-10 from ``data`` with --download (from ``url``), as a training worker does;
    it prints ``loading`` right before, then the number of training images."""
    code = ("import json, sys; from cifar_server import point_torchvision_at; "
            "point_torchvision_at(sys.argv[1], json.loads(sys.argv[2])); from raydistill.data import load_dataset; "
            "print('loading', flush=True); print(len(load_dataset('cifar10', sys.argv[3], download=True, val_size=0).train_y))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    return subprocess.Popen([sys.executable, "-c", code, url, json.dumps(sums), str(data)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def s3_reads(folder: Path, key: str) -> int:
    """GET requests for object ``key`` of the bucket in the log of the S3Server of ``folder``."""
    return (folder / "moto.log").read_text().count(f"GET /raydistill/{key} HTTP")


def wait_for(what, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not what():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


# ============================================================================= one machine, no Ray
def test_second_process_waits_for_the_first_download_and_downloads_nothing(tmp_path, archive, serve):
    srv, data = serve("stall"), tmp_path / "data"
    first = loader_process(srv.url, archive[1], data)
    assert srv.sent_half.wait(120), first.stderr.read() if first.poll() is not None else "no request"
    second = loader_process(srv.url, archive[1], data)
    assert second.stdout.readline().strip() == "loading", second.stderr.read()
    time.sleep(2)  # the second one is at the lock now, the first one still mid-download
    srv.release()
    outs = [p.communicate(timeout=300) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.split()[-1] for out, _ in outs] == ["100", "100"]
    assert srv.downloads == 1
    assert listing(data) == [LOCK, FOLDER]  # no archive, no leftovers


def test_killed_download_leaves_only_a_partial_folder_never_read_and_cleaned_up(tmp_path, archive, serve, monkeypatch):
    srv, data = serve("stall"), tmp_path / "data"
    proc = loader_process(srv.url, archive[1], data)
    assert srv.sent_half.wait(120), "no request"
    wait_for(lambda: any(data.glob(".partial-*/cifar-10-python.tar.gz")))  # the archive being written
    proc.kill()
    proc.wait(60)
    left = listing(data)
    assert FOLDER not in left and len(left) == 2 and left[0].startswith(".partial-") and left[1] == LOCK, left
    point_torchvision_at(srv.url, archive[1], monkeypatch.setattr)
    with pytest.raises(UsageError, match="CIFAR-10 not found in --data-dir"):
        load_dataset("cifar10", data, val_size=0)  # the half-written download is not taken for the dataset
    srv.mode = "whole"
    assert len(load_dataset("cifar10", data, download=True, val_size=0).train_y) == 100
    assert srv.downloads == 2 and listing(data) == [LOCK, FOLDER]  # the partial folder cleaned up


def test_download_cut_off_is_one_line_and_the_next_one_downloads_it_whole(tmp_path, archive, serve, monkeypatch):
    srv, data = serve("cut"), tmp_path / "data"
    point_torchvision_at(srv.url, archive[1], monkeypatch.setattr)
    with pytest.raises(UsageError) as err:
        load_dataset("cifar10", data, download=True, val_size=0)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"could not download CIFAR-10 into --data-dir {data} from {srv.url}")
    assert listing(data) == [LOCK]
    srv.mode = "whole"
    d = load_dataset("cifar10", data, download=True, val_size=0)
    assert (len(d.train_y), len(d.test_y), srv.downloads) == (100, 20, 2)
    assert listing(data) == [LOCK, FOLDER] and listing(data / FOLDER) == sorted(set(archive[1]) - {"cifar-10-python.tar.gz"})


def test_files_failing_their_md5_are_not_put_in_place_and_an_incomplete_folder_is_replaced(tmp_path, archive,
                                                                                           serve, monkeypatch):
    srv, data = serve(), tmp_path / "data"
    (data / FOLDER).mkdir(parents=True)
    (data / FOLDER / "data_batch_1").write_text("left by an older, interrupted download")
    point_torchvision_at(srv.url, {**archive[1], "test_batch": "0" * 32}, monkeypatch.setattr)
    with pytest.raises(UsageError, match=r"files failing their md5 check \(test_batch\)"):
        load_dataset("cifar10", data, download=True, val_size=0)
    assert listing(data) == [LOCK, FOLDER] and listing(data / FOLDER) == ["data_batch_1"]
    point_torchvision_at(srv.url, archive[1], monkeypatch.setattr)
    assert len(load_dataset("cifar10", data, download=True, val_size=0).train_y) == 100
    assert listing(data) == [LOCK, FOLDER] and md5(data / FOLDER / "data_batch_1") == archive[1]["data_batch_1"]


def test_missing_archive_is_one_line_naming_the_folder(tmp_path, serve, monkeypatch):
    import torchvision

    srv, data = serve(), tmp_path / "data"
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "url", srv.url + ".missing")
    with pytest.raises(UsageError) as err:
        load_dataset("cifar100", data, download=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"could not download CIFAR-100 into --data-dir {data}"), msg
    assert "HTTP Error 404" in msg and f"{data}/cifar-100-python/" in msg, msg
    assert listing(data) == [LOCK] and srv.downloads == 0


def test_data_dir_that_cannot_be_written_is_one_line(tmp_path, serve):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError) as err:  # (a folder without write permission is the same, but not for root)
        load_dataset("cifar10", tmp_path / "file" / "data", download=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"could not download CIFAR-10 into --data-dir {tmp_path}/file/data"), msg


def test_tinyimagenet_download_takes_the_same_path(tmp_path, monkeypatch):
    src = tmp_path / "src" / "tiny-imagenet-200"
    (src / "val" / "images").mkdir(parents=True)
    (src / "wnids.txt").write_text("n02\nn01\n")
    rows = []
    for i, w in enumerate(["n01", "n02"]):
        (src / "train" / w / "images").mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(src / "train" / w / "images" / f"{w}_{k}.JPEG")
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(src / "val" / "images" / f"val_{i}.JPEG")
        rows.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (src / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    zipped = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for f in sorted(src.rglob("*")):
            z.write(f, f.relative_to(src.parent))
    srv = ArchiveServer(zipped)
    try:
        monkeypatch.setattr(raydistill.data, "TINY_URL", srv.url)
        monkeypatch.setattr(raydistill.data, "TINY_MD5", md5(zipped))
        d = load_dataset("tinyimagenet", tmp_path / "data", download=True, val_size=0)
        assert (d.num_classes, len(d.train_y), d.test_y.tolist(), srv.downloads) == (2, 6, [0, 1], 1)
        assert listing(tmp_path / "data") == [LOCK, "tiny-imagenet-200"]
    finally:
        srv.stop()


def test_remote_data_dir_is_copied_once_per_node(tmp_path, archive, monkeypatch):
    s3 = S3Server(tmp_path)
    try:
        for k, v in {**s3.env, "RAYDISTILL_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(k, v)
        storage.upload(tmp_path / "archive" / "src" / FOLDER, s3.uri("data", FOLDER))
        point_torchvision_at("http://127.0.0.1:9/unused", archive[1], monkeypatch.setattr)
        a = load_dataset("cifar10", s3.uri("data"), val_size=0)
        mirrors = listing(tmp_path / "cache" / "data")
        assert len(a.train_y) == 100 and len(mirrors) == 2 and mirrors[1] == mirrors[0] + ".lock", mirrors
        copied = tmp_path / "cache" / "data" / mirrors[0] / FOLDER / "test_batch"
        stamp = copied.stat().st_mtime_ns
        b = load_dataset("cifar10", s3.uri("data") + "/", val_size=0)  # the same folder: the same copy
        assert (b.test_y == a.test_y).all() and copied.stat().st_mtime_ns == stamp
        assert listing(tmp_path / "cache" / "data") == mirrors
        assert s3_reads(tmp_path, f"data/{FOLDER}/test_batch") == 1
        with pytest.raises(UsageError, match=f"CIFAR-100 not found .*--data-dir {s3.uri('data')}, copied to this node"):
            load_dataset("cifar100", s3.uri("data"))
        with pytest.raises(UsageError, match="is not a folder in the storage"):
            load_dataset("cifar10", s3.uri("nowhere"))
    finally:
        s3.stop()


# ============================================================================= train and evaluate, Ray workers
def run_flags(workdir: Path, name: str, data) -> list[str]:
    return ["--data-dir", str(data), "--storage-path", str(workdir / "runs"), "--name", name,
            "--summary-json", str(workdir / f"{name}.json")]


@pytest.mark.slow
def test_two_workers_on_one_node_download_once_and_train(workdir, archive, serve, monkeypatch):
    srv, data = serve(pause=3.0), workdir / "data"  # a download that takes a while: both workers want it at once
    proc = train_with_hooks([CifarFrom(srv.url, archive[1])], *TRAIN, "--download", "--workers", "2",
                            *run_flags(workdir, "first", data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert srv.downloads == 1 and summary(workdir, "first")["epochs_completed"] == 1
    assert listing(data) == [LOCK, FOLDER]
    point_torchvision_at(srv.url, archive[1], monkeypatch.setattr)  # the next run's loading: nothing to download
    assert len(load_dataset("cifar10", data, download=True, val_size=0).train_y) == 100 and srv.downloads == 1


@pytest.mark.slow
def test_download_cut_off_on_two_workers_is_one_error_line_and_leaves_no_dataset(workdir, archive, serve):
    srv, data = serve("cut"), workdir / "data"
    proc = train_with_hooks([CifarFrom(srv.url, archive[1])], *TRAIN, "--download", "--workers", "2",
                            *run_flags(workdir, "cut", data))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], lines[-5:]
    assert lines[-1].startswith("error: could not download CIFAR-10 into --data-dir"), lines[-1]
    # the workers' tracebacks stay out of it (Ray's own actors may still log theirs, e.g. with several Ray
    # instances on the machine: "Found multiple active Ray instances")
    assert not [ln for ln in lines if "RayTrainWorker" in ln and ("Traceback" in ln or "UsageError" in ln)], lines
    assert listing(data) == [LOCK] and not (workdir / "cut.json").exists()


@pytest.mark.slow
def test_remote_data_dir_on_two_workers_one_copy_and_evaluate_reads_it(workdir, archive, monkeypatch):
    s3 = S3Server(workdir)
    try:
        cache = workdir / "cache"
        for k, v in {**s3.env, "RAYDISTILL_CACHE": str(cache)}.items():
            monkeypatch.setenv(k, v)  # the train process's environment: the local Ray it starts, and its workers
        storage.upload(workdir / "archive" / "src" / FOLDER, s3.uri("data", FOLDER))
        hooks = [CifarFrom("http://127.0.0.1:9/unused", archive[1])]
        proc = train_with_hooks(hooks, *TRAIN, "--workers", "2", *run_flags(workdir, "s3", s3.uri("data")))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(listing(cache / "data")) == 2  # one copy (and its lock) for the node's two workers
        assert s3_reads(workdir, f"data/{FOLDER}/test_batch") == 1
        ckpt = summary(workdir, "s3")["checkpoint"]
        code = ("import json, sys; from cifar_server import point_torchvision_at; "
                "point_torchvision_at('http://127.0.0.1:9/unused', json.loads(sys.argv[1])); "
                "from raydistill.evaluate import main; main(sys.argv[2:])")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
        out = workdir / "eval.json"
        ev = subprocess.run([sys.executable, "-c", code, json.dumps(archive[1]), ckpt, "--attacks", "clean",
                             "--tracking-uri", "none", "--summary-json", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
        assert ev.returncode == 0, ev.stderr[-3000:]  # the checkpoint records the URI: no --data-dir needed
        assert json.loads(out.read_text())["n_examples"] == 20
        assert s3_reads(workdir, f"data/{FOLDER}/test_batch") == 1  # evaluate read this node's copy
    finally:
        s3.stop()
