"""A real multi-node Ray cluster and a real S3-protocol server on this machine, as a user would start them.

* ``S3Server``: moto's S3 server (``moto[server]``, the dev extra) on 127.0.0.1; pyarrow's real S3 client
  talks to it through the standard variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
* ``RayCluster``: ``ray start --head`` plus ``ray start --address`` processes, each a node with its own
  ports and temporary folder, token authentication on. ``env`` is what a driver needs (``RAY_ADDRESS``, the
  token, the storage variables); the nodes were started with it, so their workers have it too (workers take
  the environment of ``ray start``, not the driver's).

Only the processes started here are stopped (each ``ray start --block`` leads its own process group), never
other Ray instances on the machine. ``python tests/cluster.py up DIR`` starts one by hand (``down DIR`` stops it).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(*procs: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process groups that ``procs`` lead, SIGKILL what is left of them after ``grace`` seconds."""
    def alive(p) -> bool:
        try:
            os.killpg(p.pid, 0)
            return True
        except ProcessLookupError:
            return False

    for p in procs:
        if alive(p):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline:
        for p in procs:
            p.poll()  # reap the leader: until then, as a zombie, it keeps its group alive
        if not any(alive(p) for p in procs):
            break
        time.sleep(0.5)
    for p in procs:
        if alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class S3Server:
    """moto's S3 server on 127.0.0.1 with one bucket; ``env`` holds the client variables."""

    def __init__(self, workdir: Path, bucket: str = "raydistill"):
        self.port, self.bucket = free_port(), bucket
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        self.log = open(workdir / "moto.log", "wb")
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start; see {workdir / 'moto.log'}")
                time.sleep(0.3)
        self.filesystem().create_dir(bucket)

    def filesystem(self):
        from pyarrow import fs

        return fs.S3FileSystem(endpoint_override=self.url, access_key="testing", secret_key="testing",
                               region="us-east-1", scheme="http", allow_bucket_creation=True)

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])

    def listdir(self, *parts: str) -> list[str]:
        from pyarrow.fs import FileSelector

        infos = self.filesystem().get_file_info(FileSelector("/".join([self.bucket, *parts]), allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def stop(self) -> None:
        _stop_group(self.proc, grace=5)
        self.log.close()


class RayCluster:
    """A head node and ``workers`` more nodes, ``cpus`` logical CPUs each; ``env``: extra environment of every
    ``ray start`` (and of drivers: ``self.env``)."""

    def __init__(self, workdir: Path, *, nodes: int = 2, cpus: int = 2, env: dict | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Ray's temporary folders, short: its socket paths must stay under 108 bytes
        self.tmp = Path(tempfile.mkdtemp(prefix="rdc-", dir="/tmp"))
        token = self.workdir / "auth_token"
        token.write_text(secrets.token_hex(32) + "\n")
        token.chmod(0o600)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        self.env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_worker_niceness": "0",
                    "RAY_DEDUP_LOGS": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.cpus = cpus
        self.nodes: list[subprocess.Popen] = []
        self.lost: set[int] = set()  # nodes a test killed (kill_node): never started again in their place
        try:
            self.start_node(head=True)
            self.wait_for_nodes(1)  # a node started before the head answers gives up
            for _ in range(nodes - 1):
                self.start_node()
            self.wait_for_nodes(nodes)
        except BaseException:
            self.stop()  # nothing left running when the cluster does not come up
            raise
        self.env["RAY_ADDRESS"] = self.address

    def start_node(self, head: bool = False, index: int | None = None) -> subprocess.Popen:
        """Start node ``index`` (default: a new one) and return its `ray start` process."""
        i = len(self.nodes) if index is None else index
        ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        lo = 20000 + 1000 * (os.getpid() % 20) + 100 * (i % 10)  # a worker port range per node
        ports += [f"--min-worker-port={lo}", f"--max-worker-port={lo + 99}"]
        if head:
            cmd = [RAY, "start", "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"]
        else:
            cmd = [RAY, "start", f"--address={self.address}"]
        cmd += ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}", "--disable-usage-stats",
                f"--temp-dir={self.tmp / f'n{i}'}", *ports]
        log = open(self.workdir / f"node{i}.log", "ab")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if index is None:
            self.nodes.append(proc)
        return proc

    def _ask(self, expression: str):
        """The value of a Python ``expression`` (``ray`` imported and connected) asked by a driver of the cluster;
        None while the head does not answer."""
        try:
            socket.create_connection(("127.0.0.1", self.gcs_port), timeout=2).close()
            out = subprocess.run([sys.executable, "-c", "import ray, json; ray.init(logging_level='ERROR'); "
                                  f"print(json.dumps({expression}))"],
                                 env={**self.env, "RAY_ADDRESS": self.address}, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else None

    def alive_nodes(self) -> int:
        """Alive nodes as the GCS sees them (0 while it does not answer yet)."""
        return self._ask("sum(1 for n in ray.nodes() if n['Alive'])") or 0

    def available(self, resource: str = "CPU") -> float:
        """How much of ``resource`` no task, actor or placement group holds now."""
        return self._ask(f"ray.available_resources().get({resource!r}, 0.0)") or 0.0

    @contextlib.contextmanager
    def hold(self, *bundles: dict, strategy: str = "SPREAD"):
        """Another job holding part of the cluster: a driver that reserves ``bundles`` in a placement group (as a
        run's worker group does) until the block ends; yields the driver's process."""
        code = ("import json, sys, time, ray; from ray.util import placement_group; ray.init(logging_level='ERROR'); "
                f"g = placement_group({list(bundles)!r}, strategy={strategy!r}); ray.get(g.ready()); "
                "print('held', g.id.hex(), flush=True); time.sleep(3600)")
        proc = subprocess.Popen([sys.executable, "-c", code], env={**self.env, "RAY_ADDRESS": self.address},
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            line = proc.stdout.readline()
            if not line.startswith("held"):
                raise RuntimeError(f"the holding driver did not reserve {bundles}")
            yield proc
        finally:
            _stop_group(proc, grace=5)

    def wait_for_nodes(self, n: int, timeout: float = 300) -> None:
        """Until ``n`` nodes are alive; a node whose `ray start` gave up (a busy machine) is started again, a node a
        test killed is not (``n`` counts it no more: a killed node and its restart would make one node too many)."""
        deadline = time.time() + timeout
        while self.alive_nodes() != n:
            for i, p in enumerate(self.nodes):
                if p.poll() is not None and i == 0:
                    raise RuntimeError(f"the head node exited; see {self.workdir / 'node0.log'}")
                if p.poll() is not None and i not in self.lost:
                    self.nodes[i] = self.start_node(index=i)
            if time.time() > deadline:
                raise RuntimeError(f"the cluster did not reach {n} nodes; see {self.workdir}/node*.log")
            time.sleep(2)

    def restore(self, n: int) -> None:
        """Back to ``n`` live nodes after a test lost some: one new node, then the wait (a killed node stays lost)."""
        if self.alive_nodes() < n:
            self.start_node()
            self.wait_for_nodes(n)

    def raylet_pid(self, node: int) -> int:
        """The raylet process of node ``node`` (in the process group of its ``ray start``)."""
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    comm = (d / "comm").read_text().strip()
                    if comm == "raylet" and os.getpgid(int(d.name)) == self.nodes[node].pid:
                        return int(d.name)
                except (OSError, ProcessLookupError):
                    continue
        raise RuntimeError(f"node {node} has no raylet")

    def kill_node(self, node: int) -> None:
        """Lose node ``node`` as a machine is lost: its raylet and every process under it (Ray's workers, each
        in a process group of its own) killed at once (SIGKILL), then the rest of its processes. (Killing the
        raylet alone leaves its workers running until they notice, training on meanwhile.)"""
        self.lost.add(node)
        raylet = self.raylet_pid(node)
        for pid in [raylet, *_descendants(raylet)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _stop_group(self.nodes[node], grace=5)

    def stop(self) -> None:
        _stop_group(*self.nodes)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _main(argv: list[str]) -> int:  # python tests/cluster.py up|down DIR
    cmd, workdir = argv[0], Path(argv[1]).resolve()
    if cmd == "up":
        s3 = S3Server(workdir)
        ray = RayCluster(workdir, env=s3.env)
        state = {"s3": s3.proc.pid, "nodes": [p.pid for p in ray.nodes], "env": {k: ray.env[k] for k in (
            "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", *s3.env)}, "dashboard": ray.dashboard,
                 "temp": str(ray.temp)}
        (workdir / "cluster.json").write_text(json.dumps(state, indent=1))
        print(" ".join(f"{k}={v}" for k, v in state["env"].items()))
        return 0
    state = json.loads((workdir / "cluster.json").read_text())
    for pid in [*reversed(state["nodes"]), state["s3"]]:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if state.get("temp"):
        shutil.rmtree(state["temp"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
