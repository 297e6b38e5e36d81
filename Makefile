# `make run` and `make test` set everything up on a fresh machine: the virtualenv, the pinned
# packages, the database (embedded PostgreSQL under var/ unless DATABASE_URL is set).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-12)

.PHONY: install run test lint format bench soak fuzz migrate clean

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "agentrun needs Python 3.11 or newer")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

migrate: install
	$(PY) manage.py migrate --no-input

run: install
	$(PY) manage.py rundev

test: install
	DJANGO_SETTINGS_MODULE=settings.test $(PY) -m pytest

# ruff (format and lint) and mypy, configured in pyproject.toml; `.ci/run` runs it before the tests.
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Rewrites the tree in the house format and applies ruff's safe fixes.
format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) bench/bench_runner_protocol.py
	$(PY) bench/bench_sessions_inbox.py
	$(PY) bench/bench_queue_dispatch.py
	$(PY) bench/bench_live.py
	$(PY) bench/bench_retention.py

# Not part of `make test`: SOAK_SECONDS (default 600) of load and faults, then the invariants (bench/README.md).
soak: install
	$(PY) bench/soak.py

# schemathesis over every route, longer than in `make test`, with its coverage phase and a random
# seed (printed, with the statuses each operation answered); AGENTRUN_FUZZ_EXAMPLES and
# AGENTRUN_FUZZ_SEED override.
fuzz: install
	AGENTRUN_FUZZ_EXAMPLES=$${AGENTRUN_FUZZ_EXAMPLES:-300} AGENTRUN_FUZZ_STATUSES=1 DJANGO_SETTINGS_MODULE=settings.test \
		$(PY) -m pytest tests/test_schemathesis.py -p no:cacheprovider -q -o timeout=0

clean:
	rm -rf $(VENV) var
