# Set-up and everyday commands. Each target creates the virtual environment when it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart study test test-fast venv clean gpu-check gpu-wheels gpu-data datasets realdata

$(BIN)/activate: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(BIN)/activate

venv: $(BIN)/activate

quickstart: $(BIN)/activate
	$(BIN)/python -m raydistill.quickstart

study: $(BIN)/activate
	$(BIN)/python -m raydistill.study quickstart --summary-json study.json

test: $(BIN)/activate datasets
	$(BIN)/python -m pytest -q --durations=25

test-fast: $(BIN)/activate datasets
	$(BIN)/python -m pytest -q -m 'not slow'

# Fashion-MNIST's four IDX files from Debian's package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist),
# installed where missing (needs apt-get and root or sudo; elsewhere a note, and --download fetches them instead)
datasets:
	bash .ci/install-datasets.sh

# The CPU check that learns on real images (scripts/realdata.py): PGD-AT on Fashion-MNIST, RSLAD from it, clean
# and PGD-20 on all 10,000 test images, AutoAttack on the first 500; resumable (the same command continues).
# REALDATA_ARGS: the script's options, e.g. REALDATA_ARGS='--out /tmp/rd --train-size 2000'
REALDATA_ARGS ?=
realdata: $(BIN)/activate datasets
	$(BIN)/python scripts/realdata.py --download $(REALDATA_ARGS)

# The GPU check (raydistill/gpucheck/): needs no virtual environment, Ray or MLflow; on a bare GPU
# machine the interpreter with PyTorch (python3) runs it. It installs the wheels in $(GPU_CHECK_WHEELS)
# (scripts/fetch-gpu-wheels.sh) and raydistill, both without dependencies, into a temporary target
# folder, and writes gpu-check.json and gpu-check.md into $(GPU_CHECK_OUT). Without CUDA it skips the
# GPU parts and says so (seconds).
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
GPU_CHECK_OUT ?= gpu-check
GPU_CHECK_WHEELS ?= .whl
export GPU_CHECK_OUT GPU_CHECK_WHEELS

gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m raydistill.gpucheck

gpu-wheels:
	bash scripts/fetch-gpu-wheels.sh

# The real-data leg's files: Fashion-MNIST's four IDX files (30 MB) copied from Debian's package into
# data/FashionMNIST/raw/ (git-ignored: a device call names data/FashionMNIST in its carry)
gpu-data: datasets
	mkdir -p data/FashionMNIST/raw
	cp /usr/share/datasets/fashion-mnist/*-ubyte.gz data/FashionMNIST/raw/

clean:
	rm -rf $(VENV) *.egg-info
