# The two commands: `make run` (the main job on the embedded default) and `make test` (the whole suite).
# Both create .venv on first use with the pinned install; nothing else needs setting up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run data train test test-fast clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch and torchvision first: these exact versions lie on this machine's disk (no multi-GB download)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

data: setup
	$(BIN)/flamingo-data

# Main job on the embedded default: write the world (skipped when already there), then train.
run: data
	$(BIN)/flamingo-train $(ARGS)

# Tests use tiny models: one thread per process is faster than two fighting over 2 cores.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/pytest $(ARGS)

test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/pytest -m "not slow" $(ARGS)

clean:
	rm -rf outputs multirun data/embedded
