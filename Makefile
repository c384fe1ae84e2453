# Set-up and everyday commands. Each target creates the virtual environment when it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test test-fast venv clean

$(BIN)/activate: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(BIN)/activate

venv: $(BIN)/activate

quickstart: $(BIN)/activate
	$(BIN)/python -m raydistill.quickstart

test: $(BIN)/activate
	$(BIN)/python -m pytest -q --durations=25

test-fast: $(BIN)/activate
	$(BIN)/python -m pytest -q -m 'not slow'

clean:
	rm -rf $(VENV) *.egg-info
