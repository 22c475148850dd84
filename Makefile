# The two commands of the README: `make demo` (main job on the bundled sample Hub) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean bench mutants lint

$(BIN)/hpcstage: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/hpcstage

demo: install
	$(BIN)/python scripts/demo.py

# As root, the suite starts the one-node Slurm test cluster first (scripts/slurm-test-cluster.sh).
# The job stacks (datasets 4.0 / 2.21 / current venvs and the llamafactory training one, outside the repo) are
# built once and then reused.
test: install
	@if [ "$$(id -u)" = 0 ] && [ -x scripts/slurm-test-cluster.sh ]; then scripts/slurm-test-cluster.sh start; fi
	$(BIN)/python scripts/job-stacks.py build
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# hpcstage against hf download / curl / aria2c on a local Hub; writes bench/results.md (bench/README.md).
# Quick run: make bench BENCH_ARGS="--rounds 1 --size-mb 256". The wan scenario needs aria2c: installed
# here as root (Debian), else the bench says how.
bench: install
	@if ! command -v aria2c >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y --no-install-recommends aria2 >/dev/null || { apt-get update >/dev/null && \
		apt-get install -y --no-install-recommends aria2 >/dev/null; }; fi
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# ruff (lint and format) and mypy on src/ (pyproject.toml holds their settings); .ci/run runs it before the tests.
lint: install
	$(BIN)/pip install -q -e '.[test,lint]'
	$(BIN)/ruff check src
	$(BIN)/ruff format --check src
	$(BIN)/mypy

# Mutation testing of the critical modules (slow: one test run per mutant); MUTANTS="policy archive" picks.
mutants: install
	$(BIN)/pip install -q -e '.[test,mutation]'
	$(BIN)/python scripts/mutants.py $(MUTANTS)

clean:
	rm -rf demo-work .pytest_cache
