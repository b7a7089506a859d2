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

.PHONY: setup run data study smoke test test-fast clean

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

# Main job on the embedded default: write the world (skipped when already there), build or reuse the
# pretrained LM and vision encoder (cached in data/embedded/cache), train the Table 3 baseline row, evaluate.
run: data
	$(BIN)/flamingo-train experiment=baseline $(ARGS)

# The whole Table 3 study at the embedded scale (19 rows x 3 seeds; resumable: complete rows are skipped).
study: setup
	$(BIN)/flamingo-sweep sweeps/table3.yaml $(ARGS)

# Every row of the study for a few steps on the tiny world (what CI runs inside the tests).
smoke: setup
	$(BIN)/flamingo-sweep sweeps/table3.yaml scale=smoke seeds=1 threads=1 $(ARGS)

# Tests use tiny models: one thread per process is faster than two fighting over 2 cores.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/pytest $(ARGS)

test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/pytest -m "not slow" $(ARGS)

clean:
	rm -rf outputs multirun data/embedded data/tiny
