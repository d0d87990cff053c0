# One command per verb; CI and the README use the same ones.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test check bench demo servers clean

install: $(STAMP)

# The venv's own pip comes first, from its hashed lock: the one `python3 -m venv` bundles
# is too old for the project's lock (requirements-pip.lock says why).
$(STAMP): requirements-pip.lock requirements-dev.lock pyproject.toml
	@scripts/ensure-venv.sh $(PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements-pip.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

# Installs Mosquitto, InfluxDB and PostgreSQL from the distribution when missing.
servers:
	@scripts/ensure-servers.sh

test: install servers
	$(BIN)/pytest

check: install node_modules/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	node_modules/.bin/eslint api/dashboard/js eslint.config.js

# ESLint for the dashboard's JavaScript, pinned in package-lock.json; Node.js and npm from
# the distribution when missing (scripts/ensure-node.sh).
node_modules/.installed: package-lock.json
	@scripts/ensure-node.sh
	npm ci --no-audit --no-fund
	@touch $@

bench: install servers
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.alerting
	$(BIN)/python -m bench.registry
	$(BIN)/python -m bench.stream
	$(BIN)/python -m bench.registry_import
	$(BIN)/python -m bench.outbox_prune
	$(BIN)/python -m bench.soak
	$(BIN)/python -m bench.city

# Everything embedded: broker, stores, a seeded pilot and its storyline. Nothing to install.
demo: install
	$(BIN)/smartcover demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
