"""The house's rules that a change can break without any behaviour changing."""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raydistill"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these modules: {long}"


def test_the_configuration_is_written_only_by_replace():
    """TrainConfig and Placement are frozen: no module assigns their fields (cfg.x = ...)."""
    import dataclasses
    import re

    from raydistill.config import Placement, TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(Placement)}
    write = re.compile(rf"\bcfg\.(?:placement\.)?(?:{'|'.join(sorted(names))})\s*=(?!=)")
    for p in PACKAGE.rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            assert not write.search(line.split("#", 1)[0]), f"{p}:{i}: {line.strip()}"


def import_graph() -> dict[str, set[str]]:
    """raydistill's modules -> the raydistill modules each imports, read from the source (ast): module-level imports
    and those inside functions alike (a lazy import still ties the two modules: a cycle through one only waits for
    its first call). ``from X import name`` counts as an import of X.name when that is a module, else of X. An
    import of a module's own package (``from . import x`` in a package's ``__main__``) is no edge: Python imports
    a module's packages before the module, whatever it says."""
    import ast

    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)

    def known(name: str) -> str | None:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        out = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in filter(None, map(known, targets)):
                if t != mod and not mod.startswith(t + "."):
                    out.add(t)
    return graph


def test_no_import_cycle():
    """No raydistill module imports, directly or through others, a module that imports it (e.g. the option table
    importing what it configures, which imports the option table): every choice list lives below both
    (raydistill/choices.py)."""
    graph = import_graph()
    assert "raydistill.errors" in graph["raydistill.choices"]  # the walk sees module-level imports
    assert "raydistill.engine" in graph["raydistill.train"]  # ... and those inside functions
    done: set[str] = set()
    for start in sorted(graph):
        stack, path, on_path = [(start, iter(sorted(graph[start])))], [start], {start}
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif nxt in on_path:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in done:
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
                on_path.add(nxt)
