"""The digest of a plugin's code: what provenance records and the relaunch checks compare."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

DIGEST_SUFFIXES = (".py", ".yaml", ".yml")  # a package's files that make its digest


def digest(roots: Iterable[str | os.PathLike]) -> str:
    """``sha256:<hex>`` of a file's bytes, or of the Python and YAML files (names and contents) under folders."""
    roots = [Path(r) for r in roots]
    if len(roots) == 1 and roots[0].is_file():
        return "sha256:" + hashlib.sha256(roots[0].read_bytes()).hexdigest()
    h = hashlib.sha256()
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                     and p.suffix in DIGEST_SUFFIXES and "__pycache__" not in p.parts)
        for p in files:
            h.update(f"{p.relative_to(root.parent)}\0".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return "sha256:" + h.hexdigest()
