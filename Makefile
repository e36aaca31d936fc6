# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PYTHONHASHSEED := 0

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python scripts/compose_schema.py $(VENV)/share/compose-spec.json
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	bash scripts/demo.sh $(BIN)

bench: setup
	$(BIN)/python bench/curate_throughput.py
	$(BIN)/python bench/mismatch.py
	$(BIN)/python bench/train_step.py

clean:
	rm -rf data/raw data/curated data/split data/incoming data/eval models reports mlruns mlartifacts mlflow.db demo
