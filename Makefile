# The two README commands: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build first (a plain `torch` requirement would pull a multi-GB CUDA build); GPU users
# override it, e.g. `make run TORCH=torch==2.13.0+cu126 ...`, or install torch into .venv first.
TORCH  ?= torch==2.13.0
CONFIG ?= configs/default.yaml

.PHONY: install run test bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/slmflow run --config $(CONFIG)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/dedup.py
	$(BIN)/python benchmarks/train.py

clean-venv:
	rm -rf $(VENV)
