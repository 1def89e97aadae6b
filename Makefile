# The two commands of the quick start (`make test`, and `make serve` once the listeners land)
# create the venv themselves, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Reinstall when the project's metadata changes; the stamp records the last install.
STAMP := $(VENV)/.mailedge-installed

.PHONY: venv lint test serve bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# Benchmarks are scripts, never tests. The Python peers live in their own venv
# so they can never leak into the project's dependencies or its test runs.
BENCH_VENV ?= .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.mailedge-bench-installed

$(BENCH_STAMP): pyproject.toml benchmarks/requirements-peers.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -e . -r benchmarks/requirements-peers.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/parse.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis

# The example mail server on its embedded default (loopback only); Ctrl-C drains and stops.
serve: venv
	$(BIN)/python examples/mailserver.py
