# The two commands of the quick start (`make serve` and `make test`) create the venv
# themselves, so a fresh clone needs nothing else. `make serve` installs only what serving
# needs (the [server] extra); `make test` and the other targets add the dev toolchain.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Reinstall when the project's metadata changes; each stamp records the last install.
STAMP := $(VENV)/.mailedge-installed
SERVE_STAMP := $(VENV)/.mailedge-server-installed
# Arguments for the example server: make serve ARGS="--log-level DEBUG".
ARGS ?=

.PHONY: venv lint test serve bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(SERVE_STAMP)

$(SERVE_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server]'
	touch $(SERVE_STAMP)

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
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[redis]' -r benchmarks/requirements-peers.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) venv
	$(BENCH_VENV)/bin/python benchmarks/parse.py
	$(BENCH_VENV)/bin/python benchmarks/gate_overhead.py
	$(BENCH_VENV)/bin/python benchmarks/half_headers.py
	$(BENCH_VENV)/bin/python benchmarks/redis_clients.py
	$(BENCH_VENV)/bin/python benchmarks/message_memory.py
	$(BENCH_VENV)/bin/python benchmarks/store_overhead.py
	# Starts its servers with the test suite's support code, so it runs in the dev venv.
	$(BIN)/python benchmarks/store_failover.py

# Fuzz the PROXY codec: atheris for FUZZ_TIME seconds over the checked-in seeds (new inputs
# and crashes go to .fuzz-corpus/, never into fuzz/corpus), then the Hypothesis properties
# at the fuzz profile's example count.
FUZZ_TIME ?= 60
fuzz: venv
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	mkdir -p .fuzz-corpus
	$(BIN)/python fuzz/fuzz_parse.py -max_total_time=$(FUZZ_TIME) -timeout=10 \
		-rss_limit_mb=2048 -artifact_prefix=.fuzz-corpus/ .fuzz-corpus fuzz/corpus
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest tests/proxy -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(BENCH_VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis .fuzz-corpus

# The example mail server on its embedded default (loopback only); Ctrl-C drains and stops,
# a second Ctrl-C stops at once. Only the [server] extra is installed for it.
serve: $(SERVE_STAMP)
	$(BIN)/python examples/mailserver.py $(ARGS)
