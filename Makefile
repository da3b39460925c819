# One entry point for developers, CI and ops. Every target uses the project's own virtualenv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PACKAGES := libs/contracts libs/runtime libs/devtools services/orders services/payments services/calendar \
            services/notifications services/gateway sandbox
ROLE ?= admin
SUB ?= dev-$(ROLE)

.PHONY: install lock run test test-fast migrate lint format asyncapi token bench demo drills

$(PY):
	uv venv --python 3.11 $(VENV)

## install: the locked, hashed dependencies plus every workspace package (editable)
install: $(VENV)/.installed

# Re-installs only when the lock or a package's pyproject changed. Bytecode is compiled once
# here: where PYTHONDONTWRITEBYTECODE is set (this machine sets it), every service, test and
# drill process would otherwise recompile all it imports at each start (~1 s of CPU each).
$(VENV)/.installed: requirements.lock pyproject.toml $(addsuffix /pyproject.toml,$(PACKAGES)) | $(PY)
	uv pip sync --python $(PY) --require-hashes --compile-bytecode requirements.lock
	uv pip install --python $(PY) --no-deps --reinstall $(addprefix -e ,$(PACKAGES))
	$(PY) -m compileall -q $(addsuffix /src,$(PACKAGES))
	touch $@

## lock: re-resolve and rewrite requirements.lock (exact versions, hashes, no download hosts)
lock:
	uv lock
	uv export --frozen --all-packages --no-emit-workspace --all-groups --format requirements-txt -o requirements.lock

## run: every service plus the sandbox providers as local processes; migrations first; Ctrl-C stops all
run: install
	$(PY) -m booking.devtools.devrun

## migrate: each service migrates its own schema
migrate: install
	for s in orders payments calendar notifications; do $(PY) -m booking.$$s migrate || exit 1; done

## test: every test against the local (or $$DATABASE_URL / $$RABBITMQ_URL) Postgres and RabbitMQ:
## first those that start no whole system, on two workers (they mostly wait on the servers), then
## the whole-system modules (tests/e2e, marker e2e) two at a time, each module on one worker with
## its own system, then the fault drills alone (they time outages and load the machine)
DRILLS := tests/e2e/test_fault_drills.py
test: install
	$(PY) -m pytest -m "not e2e" -n 2
	$(PY) -m pytest -m e2e -n 2 --dist loadfile --ignore $(DRILLS)
	$(PY) -m pytest $(DRILLS)

## drills: only the fault drills (kill -9, broker and database restarts, provider outages) under
## load; `make test` runs them too
drills: install
	$(PY) -m pytest $(DRILLS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## asyncapi: write the AsyncAPI document generated from libs/contracts
asyncapi: install
	$(PY) -m booking.contracts.asyncapi > docs/asyncapi.json
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
