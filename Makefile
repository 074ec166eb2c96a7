# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Official Tailscale clients are built once per version into this cache, outside the repo.
export PYHEADSCALE_CACHE ?= $(HOME)/.cache/pyheadscale

.PHONY: serve test unit integration lint clients bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/pyheadscale serve

clients: $(STAMP)
	$(PY) -m tests.integration.build_clients
	$(PY) -m tests.integration.idp

lint: $(STAMP)
	$(VENV)/bin/ruff check pyheadscale derp tests
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit tests/conformance tests/db

integration: $(STAMP) clients
	$(PY) -m pytest -q tests/integration

# One pytest run so the summary line ends the output.
test: $(STAMP) lint clients
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP) clients
	$(PY) -m tests.bench.control
	$(PY) -m tests.bench.derp

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
