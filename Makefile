# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
# Official Tailscale clients are built once per version into this cache, outside the repo.
export PYHEADSCALE_CACHE ?= $(HOME)/.cache/pyheadscale

.PHONY: serve test unit integration lint clients bench bench-derp fuzz clean

# `make serve` installs only what the server needs; the test targets add the dev tools.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(DEVSTAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(DEVSTAMP)

serve: $(STAMP)
	$(VENV)/bin/headscale serve

clients: $(DEVSTAMP)
	$(PY) -m tests.integration.build_clients --extra derper,derpprobe --ws-derp
	$(PY) -m tests.integration.ts2021ws_build
	$(PY) -m tests.integration.tsrs_build
	$(PY) -m tests.integration.idp
	$(PY) -m tests.apiv2.build
	$(PY) -m tests.gocheck.oracle
	$(PY) -m tests.bench.build_go pebble pebble-challtestsrv

lint: $(DEVSTAMP)
	$(VENV)/bin/ruff check pyheadscale derp tests
	$(VENV)/bin/mypy

unit: $(DEVSTAMP)
	$(PY) -m pytest -q tests/unit tests/conformance tests/db

# Integration tests mostly wait on daemons and the network, so several run at once even on
# two cores: each worker's tests live in namespaces of their own (tests/integration/README.md).
# A file is the unit of work (its tests may share a module fixture and build on each other);
# files go out in collection order, so the long integration files start first and the short
# unit files fill the end.
TEST_WORKERS ?= 4
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

integration: $(DEVSTAMP) clients
	$(PY) -m pytest -q $(XDIST) tests/integration

# One pytest run so the summary line ends the output.
test: $(DEVSTAMP) lint clients
	$(PY) -m pytest -q -p no:cacheprovider $(XDIST) tests

# Seeded fuzzing of every parser and server path a client or admin reaches (tests/fuzz);
# `make test` runs a small count of it (tests/unit/test_fuzz.py).
FUZZ_COUNT ?= 1000000
FUZZ_SEED ?= 1
fuzz: $(DEVSTAMP)
	$(PY) -m tests.fuzz --count $(FUZZ_COUNT) --seed $(FUZZ_SEED)

bench: $(DEVSTAMP) clients
	$(PY) -m tests.bench.build_go
	$(PY) -m tests.bench.control
	$(PY) -m tests.bench.derp
	$(PY) -m tests.bench.policy

# The DERP relay against derper at saturation (builds derper and derpload from the Go module
# proxy on first use); see tests/bench/README.md.
bench-derp: $(DEVSTAMP)
	$(PY) -m tests.bench.derp

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
