# skiplock: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The machine's Postgres, for `make test-system` (CI runs the suite against it and the embedded one).
SYSTEM_PG ?= postgresql://postgres@127.0.0.1:5432/postgres
# The suite runs on this many pytest-xdist processes (0: in this one). Most tests wait on leases,
# polls and processes rather than compute, so two are worth it even on two cores. A module's
# tests stay on one process (loadfile): module fixtures such as the plans' big database are
# built once. Each process has its own embedded Postgres, or its own databases on TEST_DATABASE_URL.
TEST_WORKERS ?= 2
PYTEST_XDIST = -n $(TEST_WORKERS) --dist loadfile

.DEFAULT_GOAL := help
.PHONY: help run test test-system chaos bench soak scaling lint format schema docs clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# Debian packages the tests drive: libfaketime (a worker whose clock is wrong). Installed when
# missing (as root, with apt-get); elsewhere the tests that need them are skipped.
# chromium: tests/system/test_dashboard.py drives it through Playwright (never `playwright install`).
# pgbouncer: tests/system/test_pgbouncer.py runs the API behind it, in transaction mode.
# haproxy, iproute2: tests/chaos/test_hosts.py's hosts (network namespaces) and their balancer.
TEST_DEBS = faketime chromium pgbouncer haproxy iproute2

# $(call debs,packages): install the missing ones of these Debian packages, when we can.
define debs
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq $$missing >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null && apt-get install -y -qq $$missing >/dev/null; } || \
	      echo "could not install:$$missing (the tests that need them are skipped)"; \
	  else echo "missing Debian packages:$$missing (the tests that need them are skipped)"; fi; \
	fi
endef

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# The project itself, editable: the `skiplock` command (.venv/bin/skiplock).
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

$(VENV)/.dev: requirements-dev.txt client/pyproject.toml $(VENV)/.runtime
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	# The Python client (client/, its own distribution), editable: tests/client/ drive it.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e client
	touch $@

run: $(VENV)/.runtime ## Start the API on 127.0.0.1:8000 and the workers (DATABASE_URL, else an embedded Postgres)
	$(PY) -m skiplock.launcher

test: $(VENV)/.dev ## Run the whole test suite on TEST_WORKERS processes (TEST_DATABASE_URL, else an embedded Postgres)
	$(call debs,$(TEST_DEBS))
	$(PY) -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

test-system: $(VENV)/.dev ## Run the test suite against the machine's Postgres (SYSTEM_PG)
	$(call debs,$(TEST_DEBS))
	TEST_DATABASE_URL=$(SYSTEM_PG) $(PY) -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

chaos: $(VENV)/.dev ## Fault-injection suite at full size: prints the table, writes docs/chaos-latest.md
	$(call debs,$(TEST_DEBS))
	SKIPLOCK_CHAOS=full $(PY) -m pytest tests/chaos/test_faults.py tests/chaos/test_failover.py tests/chaos/test_hosts.py --timeout 900 --chaos-report docs/chaos-latest.md $(PYTEST_ARGS)

$(VENV)/.bench: bench/requirements.txt $(VENV)/.runtime
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $@

# PgQueuer, the bench's baseline queue, in a venv of its own: its pins conflict with ours (typer).
# bench/pgqueuer_cost.py looks for it here. When it cannot be built, the bench runs without it.
PGQ_VENV := .venv-pgqueuer

$(PGQ_VENV)/.pgqueuer: bench/requirements-pgqueuer.txt
	@{ test -x $(PGQ_VENV)/bin/python || $(PYTHON) -m venv $(PGQ_VENV); } && \
	  $(PGQ_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r bench/requirements-pgqueuer.txt && \
	  touch $@ || echo "$(PGQ_VENV) could not be built: the pgqueuer measure is skipped"

# nginx: the webhook_sender measure's receiver (without it, a slower one in Python).
BENCH_DEBS = nginx

soak: $(VENV)/.bench ## An hour at a steady rate with retention on: the tables' size and dead rows level off (docs/soak-latest.md)
	$(PY) bench/soak.py $(SOAK_ARGS)

scaling: $(VENV)/.bench ## Where one Postgres tops out: CPU, WAL, transactions per task and per idle worker (docs/scaling.md)
	$(PY) bench/scaling.py $(SCALING_ARGS)

bench: $(VENV)/.bench $(PGQ_VENV)/.pgqueuer ## Benchmarks with same-run baselines: prints the table, writes docs/benchmarks.md and plots
	$(call debs,$(BENCH_DEBS))
	@command -v wrk >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk >/dev/null; } || echo "wrk unavailable: the submit measure is skipped"
	$(PY) bench/run.py $(BENCH_ARGS)

lint: $(VENV)/.dev ## ruff (lint, formatting) and mypy (types of the engine and the API)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(VENV)/.dev ## ruff: fix what can be fixed and format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

schema: $(VENV)/.runtime ## Apply schema.sql to DATABASE_URL (idempotent; same as psql -f schema.sql)
	$(VENV)/bin/skiplock schema apply

# The README's pictures, drawn from their sources with Graphviz (Debian's graphviz, installed
# when missing); the SVGs are committed, so reading the docs needs none of this.
docs: ## Draw docs/*.svg from docs/*.dot (Graphviz)
	$(call debs,graphviz)
	for f in docs/*.dot; do dot -Tsvg "$$f" -o "$${f%.dot}.svg"; done

clean: ## Remove the virtualenvs and caches (keeps the embedded database in .skiplock/)
	rm -rf $(VENV) $(PGQ_VENV) .pytest_cache .ruff_cache
