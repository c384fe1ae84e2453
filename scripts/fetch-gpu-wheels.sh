#!/usr/bin/env bash
# Fetch into .whl/ (or $GPU_CHECK_WHEELS) the wheels `make gpu-check` needs that a bare GPU machine may
# lack: pytest and its pure-Python dependencies, pytest-timeout, and pyautoattack (the real-data leg's AutoAttack;
# its wheel is rewritten without its examples/ folder, a 44 MB test model, so that the wheels and the 30 MB of
# Fashion-MNIST stay within what a device call carries). Python 3.12, manylinux x86_64;
# pinned versions, no dependency resolution (--no-deps: every needed wheel is named here). Not Ray,
# MLflow or Optuna: the check needs none of them. Run where the package index is reachable;
# the folder then travels with the checkout (it is git-ignored: never commit wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEST=${GPU_CHECK_WHEELS:-.whl}
WHEELS=(
    pytest==9.2.0
    pluggy==1.7.0
    iniconfig==2.3.1
    packaging==26.4
    pygments==2.21.0
    pytest-timeout==2.4.0
    pyautoattack==0.2.0
)
mkdir -p "$DEST"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
# pyautoattack's wheel without examples/ (and their RECORD lines): the package's code is all the check imports
"$PY" - "$DEST"/pyautoattack-0.2.0-py3-none-any.whl <<'PYEOF'
import os, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as zi:
    items = [(it, zi.read(it.filename)) for it in zi.infolist() if "/examples/" not in it.filename]
with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as zo:
    for it, data in items:
        if it.filename.endswith("/RECORD"):
            data = b"".join(line + b"\n" for line in data.splitlines() if b"/examples/" not in line)
        zo.writestr(it, data)
os.replace(path + ".tmp", path)
PYEOF
ls -l "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -1
