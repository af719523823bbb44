# intentqueue: `make run` starts everything, `make test` runs lint and the whole suite,
# `make bench` the benchmarks (all scenarios, or BENCH_ARGS="execution --intents 300"),
# `make chaos` the chaos run.
# The interpreter: $(PYTHON) if given, else python3.13 or python3.12 on PATH, else pyenv's.

SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= $(shell for c in python3.13 python3.12; do \
	  $$c -c 'import sys; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null && exit; \
	done; \
	root=$$(pyenv root 2>/dev/null); \
	for p in $$root/versions/3.13*/bin/python3 $$root/versions/3.12*/bin/python3; do \
	  [ -x "$$p" ] && echo "$$p" && exit; \
	done)
STAMP := $(VENV)/.installed
# PostgreSQL for the second run of the suite; skipped when it does not answer.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres

.PHONY: install run test test-sqlite test-postgres lint format bench chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "Python 3.12+ not found: set PYTHON=/path/to/python3.12" >&2; exit 1; fi
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: install
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py standalone

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint test-sqlite test-postgres

test-sqlite: install
	env -u DATABASE_URL $(BIN)/python -m pytest $(PYTEST_ARGS)

test-postgres: install
	@if $(BIN)/python -c "import psycopg, sys; psycopg.connect(sys.argv[1], connect_timeout=3).close()" "$(TEST_DATABASE_URL)" 2>/dev/null; then \
	  echo "== the suite on PostgreSQL ($(TEST_DATABASE_URL))"; \
	  DATABASE_URL="$(TEST_DATABASE_URL)" $(BIN)/python -m pytest $(PYTEST_ARGS); \
	elif [ -n "$$REQUIRE_POSTGRES" ]; then \
	  echo "== PostgreSQL at $(TEST_DATABASE_URL) does not answer and REQUIRE_POSTGRES is set" >&2; exit 1; \
	else \
	  echo "== PostgreSQL at $(TEST_DATABASE_URL) does not answer: the suite ran on SQLite only"; \
	fi

# Scratch database and Redis db of their own; the execution scenario needs `npm ci` (anvil).
bench: install
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py intentqueue_bench $(BENCH_ARGS)

# The chaos run (needs `npm ci`: anvil); CHAOS_ARGS="--intents 300 --kill-every 1" etc.
CHAOS_ARGS ?= --intents 1000 --kill-every 2
chaos: install
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py intentqueue_chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
