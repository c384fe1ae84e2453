#!/usr/bin/env bash
# Fetch into .whl/ (or $GPU_CHECK_WHEELS) the wheels `make gpu-check` needs that a bare GPU machine may
# lack: pytest and its pure-Python dependencies, and pytest-timeout. Python 3.12, manylinux x86_64;
# pinned versions, no dependency resolution (--no-deps: every needed wheel is named here). Not Ray,
# MLflow, Optuna or pyautoattack: the check needs none of them. Run where the package index is reachable;
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
)
mkdir -p "$DEST"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -1
