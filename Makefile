# The README's commands. Each target sets up .venv itself (idempotent: quick once installed).
# A CUDA user overrides the torch wheel, e.g. `make train TORCH="torch>=2.5"`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.smollm-installed
ARGS   ?=

.PHONY: setup train test test-all lab sync-check nbtest pytest export clean bench-quick docs

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "litgpt==0.5.13"   # the bench extra's litgpt, without its hub pin
	@touch $(STAMP)

setup: $(STAMP)

## make train: the main job on the embedded default (tinyllama_nano)
# trainer.precision=auto: bf16 autocast where the CPU (or GPU) has native bf16, else fp32; its final validation loss
# was within 1% of fp32's over seeds (the closing note of issue 14). ARGS come after it: trainer.precision=fp32 wins.
train: setup
	$(BIN)/smollm-train trainer.precision=auto $(ARGS)

# Tests run two processes on two cores: one thread each, or tiny ops drown in thread contention.
TESTENV := OMP_NUM_THREADS=1

## make test: notebooks clean and library in sync, notebook tests, pytest
test: setup sync-check
	$(TESTENV) $(BIN)/nbdev-test --n-workers 2
	$(TESTENV) $(BIN)/python -m pytest -n 2 -q tests

## make test-all: also the `#| slow` notebook cells and the slow pytest marks
test-all: setup sync-check
	$(TESTENV) $(BIN)/nbdev-test --n-workers 2 --flags slow
	$(TESTENV) $(BIN)/python -m pytest -n 2 -q -m "not gpu" tests

sync-check: setup
	$(BIN)/python tools/check_sync.py

## make export: regenerate smollm/ from the notebooks and clean them (what you run after editing)
export: setup
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean

## make docs: the documentation site from the notebooks, in _docs/ (open _docs/index.html). nbdev-docs where
# Quarto is on PATH; else tools/build_docs.py builds it offline with nbdev's processing and nbconvert's renderer
docs: setup
	$(TESTENV) $(BIN)/python tools/build_docs.py

lab: setup
	$(BIN)/jupyter lab nbs

clean:
	rm -rf $(VENV) .pytest_cache
