#!/usr/bin/env bash
# Installs Debian's package dataset-fashion-mnist (the four Fashion-MNIST IDX files, in
# /usr/share/datasets/fashion-mnist) for tests/test_mnist.py, make realdata and the GPU check's data; does
# nothing when the files are there. Needs apt-get and root (CI containers) or sudo; where either is missing it
# says so and exits 0: the loader then downloads the files (--download) or the real-file tests skip
# (.ci/run sets RAYDISTILL_NEED_FASHION_MNIST=1, which makes them fail instead).
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
present() {
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        [ -f "$DIR/$f.gz" ] || [ -f "$DIR/$f" ] || return 1
    done
}
if present; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null || ! sudo -n true 2>/dev/null; then
        echo "note: Fashion-MNIST is not in $DIR and installing dataset-fashion-mnist needs root; run" \
             "'sudo apt-get install dataset-fashion-mnist', or give --download" >&2
        exit 0
    fi
    SUDO="sudo -n"
fi
if ! command -v apt-get >/dev/null; then
    echo "note: no apt-get here: Fashion-MNIST comes with --download instead of Debian's dataset-fashion-mnist" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
present
ls "$DIR"
