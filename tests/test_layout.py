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
