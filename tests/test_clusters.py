"""clusters/: the cluster-launcher YAMLs pass Ray's own schema and validation, the KubeRay manifests have the
fields KubeRay's CRDs require, and every file keeps the security rules (MLflow on loopback only, Ray's token
authentication on, no secrets)."""
from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
LAUNCHER = [CLUSTERS / "aws.yaml", CLUSTERS / "gcp.yaml"]
KUBERAY = [CLUSTERS / "kuberay" / "raycluster.yaml", CLUSTERS / "kuberay" / "rayjob.yaml"]
LOCAL = CLUSTERS / "local.sh"
DOCS = REPO / "docs" / "clusters.md"
FILES = sorted(p for p in CLUSTERS.rglob("*") if p.is_file()) + [DOCS]


def ids(paths):
    return [str(p.relative_to(REPO)) for p in paths]


def test_every_manifest_is_checked():
    assert sorted(CLUSTERS.rglob("*.yaml")) == sorted(LAUNCHER + KUBERAY)


# ============================================================================= Ray cluster launcher
def ray_schema() -> dict:
    """The schema `ray up` validates against, shipped in the installed ray package."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", LAUNCHER, ids=ids(LAUNCHER))
def test_launcher_config_passes_rays_validation(path):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, ray_schema())  # the file as written: no unknown keys, right types
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` does before it calls the cloud

    types = cfg["available_node_types"]
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert workers, "no worker node types"
    for name, t in workers.items():
        assert t.get("min_workers", 0) == 0 < t["max_workers"], f"{name} does not autoscale from zero"
        gpu = t["resources"].get("GPU", 0) > 0 or t["node_config"].get("InstanceType", "").startswith(("g", "p"))
        assert gpu, f"{name} is not a GPU node type"
    assert {"~/raydistill", "~/.ray/auth_token"} <= set(cfg["file_mounts"])
    assert any("install" in c and "-e ~/raydistill" in c for c in cfg["setup_commands"])
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    for cmd in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])
    assert any("mlflow server" in c for c in cfg["head_start_ray_commands"])


# ============================================================================= KubeRay
# Required by KubeRay's ray.io/v1 CRDs (RayCluster, RayJob); rayStartParams, minReplicas and maxReplicas
# are required by the older v1 releases and kept for them. authOptions needs KubeRay >= 1.5.1 and rayVersion.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def need(obj: dict, key: str, kind: type | tuple, where: str):
    assert isinstance(obj, dict) and key in obj, f"{where}.{key} is required"
    value = obj[key]
    assert isinstance(value, kind) and not (kind is int and isinstance(value, bool)), \
        f"{where}.{key} must be {getattr(kind, '__name__', kind)}, got {value!r}"
    return value


def check_start_params(group: dict, where: str) -> None:
    params = need(group, "rayStartParams", dict, where)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), \
        f"{where}.rayStartParams values must be strings (map[string]string)"


def check_pod_template(group: dict, where: str) -> list[dict]:
    spec = need(need(group, "template", dict, where), "spec", dict, f"{where}.template")
    containers = need(spec, "containers", list, f"{where}.template.spec")
    assert containers, f"{where}: no containers"
    for i, c in enumerate(containers):
        need(c, "name", str, f"{where}.containers[{i}]")
        need(c, "image", str, f"{where}.containers[{i}]")
        for env in c.get("env", []):
            if env["name"] == "RAY_AUTH_MODE":
                assert env.get("value") == "token", f"{where}: RAY_AUTH_MODE must stay token"
            if env["name"] == "RAY_AUTH_TOKEN":
                assert "valueFrom" in env, f"{where}: RAY_AUTH_TOKEN must come from a Secret"
    return containers


def check_cluster_spec(spec: dict, where: str) -> None:
    need(spec, "rayVersion", str, where)
    assert need(spec, "authOptions", dict, where).get("mode") == "token", f"{where}: token auth must be on"
    head = need(spec, "headGroupSpec", dict, where)
    check_start_params(head, f"{where}.headGroupSpec")
    check_pod_template(head, f"{where}.headGroupSpec")
    groups = need(spec, "workerGroupSpecs", list, where)
    assert groups, f"{where}: no worker groups"
    for i, g in enumerate(groups):
        w = f"{where}.workerGroupSpecs[{i}]"
        need(g, "groupName", str, w)
        lo, n, hi = (need(g, k, int, w) for k in ("minReplicas", "replicas", "maxReplicas"))
        assert 0 <= lo <= n <= hi and hi > 0, f"{w}: needs minReplicas <= replicas <= maxReplicas"
        check_start_params(g, w)
        containers = check_pod_template(g, w)
        assert any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers), f"{w}: no GPU"


def check_object(doc: dict, kind: str) -> dict:
    assert doc.get("apiVersion") == "ray.io/v1"
    assert doc.get("kind") == kind
    name = need(need(doc, "metadata", dict, kind), "name", str, f"{kind}.metadata")
    assert DNS_LABEL.match(name) and len(name) <= 63, f"{kind}.metadata.name {name!r} is not a DNS label"
    return need(doc, "spec", dict, kind)


def test_raycluster_manifest():
    doc = yaml.safe_load(KUBERAY[0].read_text())
    check_cluster_spec(check_object(doc, "RayCluster"), "RayCluster.spec")


def test_rayjob_manifest():
    doc = yaml.safe_load(KUBERAY[1].read_text())
    spec = check_object(doc, "RayJob")
    assert need(spec, "entrypoint", str, "RayJob.spec").startswith("python -m raydistill.tune peeraid ")
    check_cluster_spec(need(spec, "rayClusterSpec", dict, "RayJob.spec"), "RayJob.spec.rayClusterSpec")
    assert need(spec, "submissionMode", str, "RayJob.spec") in SUBMISSION_MODES
    assert need(spec, "shutdownAfterJobFinishes", bool, "RayJob.spec") is True
    need(spec, "ttlSecondsAfterFinished", int, "RayJob.spec")
    assert isinstance(yaml.safe_load(need(spec, "runtimeEnvYAML", str, "RayJob.spec")), dict)


# ============================================================================= security rules
def walk(node):
    """Every dict, list and scalar of a parsed YAML document."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def commands(path: Path) -> list[str]:
    """The commands a file runs: YAML string values, shell lines (continuations joined), Markdown code lines."""
    text = path.read_text()
    if path.suffix == ".yaml":
        return [node for node in walk(yaml.safe_load(text)) if isinstance(node, str)]
    if path.suffix == ".md":
        text = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S))
    lines = [ln for ln in text.replace("\\\n", " ").splitlines() if not ln.lstrip().startswith("#")]
    return [ln for ln in lines if ln.strip()]


def test_mlflow_servers_bind_loopback_only():
    servers = {}
    for path in FILES:
        for cmd in commands(path):
            assert "0.0.0.0" not in cmd, f"{path.name} binds to every interface: {cmd}"
            for m in re.finditer(r"mlflow (server|ui)\b[^;&|)]*", cmd):
                assert re.search(r"--host[ =]127\.0\.0\.1\b", m.group(0)), f"{path.name}: {m.group(0)}"
                servers[path.name] = servers.get(path.name, 0) + 1
    assert {"aws.yaml", "gcp.yaml", "local.sh"} <= set(servers), servers


def test_token_auth_is_never_disabled():
    for path in FILES:
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE\W{0,3}disabled", text, flags=re.I), path.name
        if path.suffix == ".yaml":  # Kubernetes env entries: {name: RAY_AUTH_MODE, value: ...}
            for node in walk(yaml.safe_load(text)):
                if isinstance(node, dict) and node.get("name") == "RAY_AUTH_MODE":
                    assert node.get("value") == "token", f"{path.name}: {node}"
    assert "export RAY_AUTH_MODE=token" in LOCAL.read_text()


SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",
    "AWS secret key": r"aws_secret_access_key\s*[=:]",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GCP service-account key": r"\"private_key(_id)?\"\s*:",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    "Google API key": r"\bAIza[0-9A-Za-z_\-]{35}\b",
    "Slack token": r"\bxox[abprs]-[0-9A-Za-z-]{10,}",
    "literal credential": r"(?i)\b(password|passwd|secret|token)\w*\s*[=:]\s*['\"]?[A-Za-z0-9+/_\-]{20,}",
}


@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_no_secrets(path):
    text = path.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        found = re.search(pattern, text)
        assert not found, f"{path.name} holds what looks like a {what}: {found.group(0)[:12]}..."


def test_local_script():
    """Valid bash; a head and a second node; Ray, MLflow and S3 on 127.0.0.1; never `ray stop`, which would stop
    every Ray on the machine; `submit` gives neither --tracking-uri nor --storage-path (`ray start` has them)."""
    assert subprocess.run(["bash", "-n", str(LOCAL)]).returncode == 0
    text = LOCAL.read_text()
    for needle in ("ray start --head", "ray start --address=", "--block", "--temp-dir=", "--node-ip-address=127.0.0.1",
                   "--dashboard-host=127.0.0.1", "moto_server -H 127.0.0.1", "ray job submit", "--working-dir .",
                   "python -m raydistill.tune", "--preset quickstart"):
        assert needle in text, needle
    cmds = commands(LOCAL)
    assert "ray stop" not in "\n".join(cmds)
    submit = [c for c in cmds if "ray job submit" in c]
    assert submit and not any("--tracking-uri" in c or "--storage-path" in c for c in submit), submit


# ============================================================================= the cluster's environment
# A job's command and every Ray worker take the environment of `ray start` on their node (not that of the shell
# that submits): every file starts Ray with the MLflow server and the storage in it, so that `ray job submit --
# python -m raydistill.tune ...` logs and stores there with no flags.
CLUSTER_VARS = ("MLFLOW_TRACKING_URI", "RAYDISTILL_STORAGE")
STORAGE_URI = re.compile(r"^(s3|gs)://\S+$")


@pytest.mark.parametrize("path", LAUNCHER, ids=ids(LAUNCHER))
def test_every_ray_start_of_a_launcher_config_has_the_cluster_environment(path):
    cfg = yaml.safe_load(path.read_text())
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2, starts
    for cmd in starts:
        exported = dict(re.findall(r"\b([A-Z_]+)=(\S+?);?(?=\s)", cmd.split("ray start")[0] + " "))
        assert set(CLUSTER_VARS) <= set(exported), cmd
        assert exported["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
        assert STORAGE_URI.match(exported["RAYDISTILL_STORAGE"]), exported


@pytest.mark.parametrize("path", KUBERAY, ids=ids(KUBERAY))
def test_every_ray_container_of_kuberay_has_the_cluster_environment(path):
    spec = yaml.safe_load(path.read_text())["spec"]
    spec = spec.get("rayClusterSpec", spec)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert all(env.get(v) for v in CLUSTER_VARS), (c["name"], env)
            assert STORAGE_URI.match(env["RAYDISTILL_STORAGE"]), env


def test_every_ray_start_of_the_local_script_has_the_cluster_environment():
    text = LOCAL.read_text()
    block = re.search(r"^CLUSTER_ENV=\((.*?)\)$", text, flags=re.S | re.M)
    assert block, "no CLUSTER_ENV=(...) in local.sh"
    env = dict(re.findall(r"\b([A-Z_]+)=(\S+)", block.group(1)))
    assert set(CLUSTER_VARS) | {"AWS_ENDPOINT_URL", "RAY_ADDRESS"} <= set(env), env
    starts = [c for c in commands(LOCAL) if "ray start" in c]
    assert len(starts) == 2, starts  # the head and the other nodes
    assert all('env "${CLUSTER_ENV[@]}" ray start' in c for c in starts), starts
