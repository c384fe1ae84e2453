"""Safe defaults, checked on the source tree: no unsafe loading, no eval of user strings, auth left on."""
from __future__ import annotations

import ast
import re
import socket
from pathlib import Path

import pytest

from conftest import REPO, assert_one_error_line, cli, run_args

SOURCES = sorted((REPO / "raydistill").rglob("*.py"))
TRACKED = [p for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts
           and "__pycache__" not in p.parts and p.suffix in {".py", ".yaml", ".yml", ".sh", ".md", ".toml", ".cfg", ""}]


def code(path: Path) -> str:
    """Source without comments and docstring-ish lines (so prose mentioning eval() doesn't count)."""
    return "\n".join(ln.split("#", 1)[0] for ln in path.read_text().splitlines())


def test_every_torch_load_is_weights_only():
    for p in SOURCES:
        for m in re.finditer(r"torch\.load\((.*)", code(p)):
            assert "weights_only=True" in m.group(1), f"{p}: {m.group(0)}"


def test_yaml_is_read_with_safe_load_only():
    for p in SOURCES:
        text = code(p)
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", text), p
        assert "yaml.Loader" not in text and "yaml.UnsafeLoader" not in text, p


def test_no_eval_or_exec_of_strings():
    for p in SOURCES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"eval", "exec", "compile", "__import__"}, f"{p}:{node.lineno}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) not in {("pickle", "load"), ("pickle", "loads"),
                                                          ("marshal", "loads")}, f"{p}:{node.lineno}"


def test_ray_token_auth_is_never_disabled_and_no_secrets_committed():
    secret = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN (RSA |EC )?PRIVATE KEY|ghp_[0-9A-Za-z]{30,}|xox[bp]-[0-9A-Za-z-]+")
    for p in TRACKED:
        text = p.read_text(errors="ignore")
        assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?(disabled|none|off)", text, re.I), p
        assert not secret.search(text), p


def test_mlflow_servers_bind_loopback():
    for p in TRACKED:
        for line in p.read_text(errors="ignore").splitlines():
            if re.search(r"mlflow (server|ui)\b", line) and "--host" in line:
                assert re.search(r"--host[ =]+127\.0\.0\.1", line), f"{p}: {line.strip()}"


@pytest.mark.slow
def test_unreachable_mlflow_server_fails_fast_before_training(workdir):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = run_args(workdir, "nomlflow")
    args[args.index("--tracking-uri") + 1] = f"http://127.0.0.1:{port}"
    proc = cli("train", "natural", "--dataset", "digits", "--workers", "0", *args, timeout=120)
    assert_one_error_line(proc, f"http://127.0.0.1:{port} is unreachable")
    assert not any((workdir / "runs").iterdir())
