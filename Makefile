# The two commands: `make run` (the main job on the embedded default) and `make test` (the whole suite).
# Both create .venv on first use with the pinned install; nothing else needs setting up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The venv holds ~6.2 GB (torch 2.14.1 is a CUDA build, with its nvidia libraries): a new one needs this
# much free disk, checked first so that a full disk says so before pip fails half-way (MIN_FREE_GB=0: skip)
MIN_FREE_GB ?= 7
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run data study baseline smoke test test-fast clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -d $(VENV) || { free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  if [ "$$free" -lt $(MIN_FREE_GB) ]; then echo "error: $$free GB free on the disk of $$(pwd), and a new .venv" \
	    "needs about $(MIN_FREE_GB) GB (torch's CUDA build): free some space (or MIN_FREE_GB=0 to try anyway)" >&2; \
	    exit 1; fi; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch and torchvision first: these exact versions lie on this machine's disk (no multi-GB download)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# The two worlds of the embedded scale: the pretraining stages' (data/embedded) and the Flamingo's (data/embedded_flamingo)
data: setup
	$(BIN)/flamingo-data
	$(BIN)/flamingo-data world=embedded_flamingo

STUDY ?= multirun/table3-embedded

# Main job: Flamingo's Table 3 at the embedded scale, from nothing to the rendered table. flamingo-sweep
# writes the world if missing, builds or reuses the pretrained LM and vision encoders (data/embedded/cache),
# trains and evaluates 19 rows x 3 seeds, the baseline 5 (2 at a time; a line per finished run), then writes table3.md/.html,
# baseline.md, the plots and runs.csv into $(STUDY); the notebook is executed on it last. Interrupted? Run it
# again: complete runs are skipped. ARGS go to flamingo-sweep (e.g. ARGS="seeds=1").
run: setup
	$(BIN)/flamingo-sweep sweeps/table3.yaml out=$(STUDY) $(ARGS); status=$$?; \
	$(BIN)/papermill --log-level WARNING notebooks/table3.ipynb $(STUDY)/table3.ipynb -p sweep_dir $(STUDY) \
	  -k python3 && echo "notebook: $(STUDY)/table3.ipynb"; exit $$status

study: run

# One run of the Table 3 baseline row (the world and pretrained parts as above).
baseline: data
	$(BIN)/flamingo-train experiment=baseline $(ARGS)

# Every row of the study for a few steps on the tiny world (what CI runs inside the tests).
smoke: setup
	$(BIN)/flamingo-sweep sweeps/table3.yaml scale=smoke seeds=1 jobs=1 threads=1 $(ARGS)

# Tests use tiny models: one thread per process is faster than two fighting over 2 cores.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/pytest $(ARGS)

test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/pytest -m "not slow" $(ARGS)

clean:
	rm -rf outputs multirun data/embedded data/embedded_flamingo data/tiny
