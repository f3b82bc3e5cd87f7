# streamsrv developer tasks. `make run` and `make test` do all set-up themselves:
# the .venv, Redis and Postgres (scripts/services.sh: the ones at $REDIS_URL / $DATABASE_URL
# when they answer, else private ones under .run/), and Debian packages the tests need.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV := .venv
BIN := $(VENV)/bin
RUN_DIR := .run
TEST_PACKAGES := asterisk-core-sounds-en-wav asterisk-core-sounds-en asterisk-core-sounds-es-wav asterisk-core-sounds-es chromium chromium-driver
# Export the service URLs that `make services` chose (private instances override).
WITH_SERVICES := if [ -f $(RUN_DIR)/services.env ]; then set -a; . $(RUN_DIR)/services.env; set +a; fi;

.PHONY: install services stop-services run test lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -c 'import ensurepip' 2>/dev/null || scripts/services.sh packages python3-venv
	test -x $(BIN)/pip || python3 -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $@

services:
	scripts/services.sh up $(RUN_DIR)

stop-services:
	scripts/services.sh down $(RUN_DIR)

run: install services
	$(WITH_SERVICES) exec $(BIN)/streamsrv serve --env-file configs/streamsrv.env

test: install lint services
	scripts/services.sh packages $(TEST_PACKAGES)
	$(WITH_SERVICES) $(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: install
	$(WITH_SERVICES) $(BIN)/streamsrv demo --env-file configs/streamsrv.env

bench: install services
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install -q -e '.[dev,bench]'
	$(WITH_SERVICES) $(BIN)/python -m benchmarks

clean:
	scripts/services.sh purge $(RUN_DIR)
	rm -rf $(VENV) $(RUN_DIR) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
