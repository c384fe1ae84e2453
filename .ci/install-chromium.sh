#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium for tests/test_mlflow_ui.py; does nothing when present.
# Needs root (CI containers) or sudo. Call it from .ci/run before `make test`.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
/usr/bin/chromium --version
