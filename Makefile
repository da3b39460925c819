# One entry point for developers, CI and ops. Every target uses the project's own virtualenv.
# `make` alone, or `make help`, lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
PACKAGES := libs/contracts libs/runtime libs/devtools services/orders services/payments services/calendar \
            services/notifications services/gateway sandbox
ROLE ?= admin
SUB ?= dev-$(ROLE)
# uv: the one on the PATH, else the project's own, in a private virtualenv of its tools (pip
# into a system Python is refused on Debian and others, PEP 668).
TOOLS := .tools
PYTHON ?= python3
UV := $(or $(shell command -v uv 2>/dev/null),$(TOOLS)/bin/uv)

.PHONY: help install lock run test test-phases test-fast clean-infra migrate migration lint format \
        asyncapi token bench demo drills

## help: list the targets
help:
	@echo "make <target>:"
	@awk '/^## [a-z][a-z-]*:/ { line = substr($$0, 4); at = index(line, ":"); \
	        printf "  %-12s %s\n", substr(line, 1, at - 1), substr(line, at + 2) }' \
	    $(firstword $(MAKEFILE_LIST))

$(TOOLS)/bin/uv: requirements-tools.lock
	@echo "uv is not on the PATH: installing it into $(TOOLS)/, a virtualenv of the project's tools"
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements-tools.lock
	touch $@

$(PY): | $(UV)
	$(UV) venv --python 3.11 $(VENV)

## install: the locked, hashed dependencies plus every workspace package (editable)
install: $(VENV)/.installed

# Re-installs only when the lock or a package's pyproject changed. Bytecode is compiled once
# here: where PYTHONDONTWRITEBYTECODE is set (this machine sets it), every service, test and
# drill process would otherwise recompile all it imports at each start (~1 s of CPU each).
$(VENV)/.installed: requirements.lock pyproject.toml $(addsuffix /pyproject.toml,$(PACKAGES)) | $(PY)
	$(UV) pip sync --python $(PY) --require-hashes --compile-bytecode requirements.lock
	$(UV) pip install --python $(PY) --no-deps --reinstall $(addprefix -e ,$(PACKAGES))
	$(PY) -m compileall -q $(addsuffix /src,$(PACKAGES))
	touch $@

## lock: re-resolve the dependencies; rewrite requirements.lock and requirements-tools.lock
# (exact versions, hashes, no download hosts)
lock: | $(UV)
	$(UV) lock
	$(UV) export --frozen --all-packages --no-emit-workspace --all-groups --format requirements-txt -o requirements.lock
	echo "uv==$$($(UV) --version | cut -d' ' -f2)" | $(UV) pip compile --generate-hashes --python-version 3.11 \
	    --no-header - -o requirements-tools.lock.new
	{ sed -n 1,2p requirements-tools.lock; cat requirements-tools.lock.new; } > requirements-tools.lock.tmp
	mv requirements-tools.lock.tmp requirements-tools.lock && rm requirements-tools.lock.new

## run: the whole system on this machine (Ctrl-C stops it); brings Postgres and RabbitMQ if none answers
# Every service plus the sandbox providers as local processes, migrations first. Postgres and
# RabbitMQ: DATABASE_URL and RABBITMQ_URL, else the local ones, else its own (booking.devtools.infra).
run: install
	$(PY) -m booking.devtools.devrun

## clean-infra: remove the data of the Postgres and RabbitMQ that make run started itself (.infra/)
clean-infra: install
	$(PY) -m booking.devtools.infra clean

## migrate: each service migrates its own schema
migrate: install
	for s in orders payments calendar notifications; do $(PY) -m booking.$$s migrate || exit 1; done

## test: every test; needs Chromium and the Postgres and RabbitMQ server programs (it says so)
# Against DATABASE_URL and RABBITMQ_URL, else the local servers, else private ones it starts as
# make run does; it names up front what the machine lacks (Chromium, server programs).
# First the tests that start no whole system, on two workers (they mostly wait on the servers),
# then the whole-system modules (tests/e2e, marker e2e) two at a time, each module on one worker
# with its own system, then the fault drills alone (they time outages and load the machine)
DRILLS := tests/e2e/test_fault_drills.py
test: install
	@$(PY) -m booking.devtools.infra check-tools
	$(PY) -m booking.devtools.infra run -- $(MAKE) --no-print-directory test-phases

# make test's phases, on the servers it settled on.
test-phases:
	$(PY) -m pytest -m "not e2e" -n 2
	$(PY) -m pytest -m e2e -n 2 --dist loadfile --ignore $(DRILLS)
	$(PY) -m pytest $(DRILLS)

## test-fast: every test that needs no server (no Postgres, RabbitMQ or browser), in under a minute
# The URLs point at a closed port, so a test that reaches a server unmarked fails
test-fast: install
	DATABASE_URL=postgresql://postgres@127.0.0.1:9/none RABBITMQ_URL=amqp://guest:guest@127.0.0.1:9/ \
	    $(PY) -m pytest -m "not e2e and not servers" -n 2 -q

## drills: only the fault drills: kill -9, broker and database restarts, provider outages, under load
# `make test` runs them too
drills: install
	$(PY) -m pytest $(DRILLS)

## migration: a new revision of a service's schema: make migration SERVICE=orders MESSAGE="..."
# Autogenerated by Alembic from its tables, against a throwaway database.
migration: install
	@if [ -z "$(SERVICE)" ] || [ -z "$(MESSAGE)" ]; then \
		echo 'usage: make migration SERVICE=<orders|payments|calendar|notifications> MESSAGE="what changes"'; \
		exit 2; \
	fi
	$(PY) -m booking.devtools.migration "$(SERVICE)" "$(MESSAGE)"

## lint: ruff, mypy and pylint's duplicate-code check (.ci/run runs it before the tests)
# ruff (style, and patterns that hang at run time), mypy (pyproject's [tool.mypy]: strict
# on libs/ and every service's domain.py and repository.py, the default elsewhere; then the tests
# at the default, without its note on each unannotated test), and pylint's duplicate-code check
# alone (pyproject's [tool.pylint]): no block of code repeated between modules
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --disable-error-code annotation-unchecked \
		libs/*/tests services/*/tests sandbox/tests tests conftest.py
	$(VENV)/bin/pylint libs/*/src services/*/src sandbox/src

## format: rewrite the code as make lint wants it (ruff's fixes and formatting)
format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## asyncapi: write the AsyncAPI document generated from the contracts and the running subscribers
asyncapi: install
	DEVELOPMENT_MODE=true $(PY) -m booking.devtools.asyncapi > docs/asyncapi.json
	@echo "wrote docs/asyncapi.json"

## token: print a signed dev token, e.g. make token ROLE=mentor SUB=<mentor id>
token: install
	@$(PY) -m booking.runtime.auth $(ROLE) $(SUB)

## demo: a narrated walkthrough against the system `make run` started (run it in another terminal)
demo: install
	$(PY) -m demo

## bench: benchmarks (never part of make test)
bench: install
	$(PY) -m bench.bookings
	$(PY) -m bench.messaging
	$(PY) -m bench.notifications_listing
	$(PY) -m bench.alerts_fanout
