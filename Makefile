# Two commands matter: `make run` and `make test`. Everything else is set-up they call.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint format bench bench-deps clean system-deps service-files

install: $(STAMP)

# Re-running is cheap: pip runs again only when a pyproject.toml changed.
$(STAMP): pyproject.toml runners/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,otel]' -e ./runners
	@touch $(STAMP)

run: install
	$(BIN)/semantica

# The tests mostly wait on daemons and runner processes: one pytest worker per core
# (pytest-xdist) halves the run on 2 cores. `pytest tests/x.py` runs in one process.
# At most 4: in a container, the host's core count is not the CPUs it may use.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ "$$n" -gt 4 ] && n=4; echo $$n)
test: install system-deps lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# Tools the tests drive as a user would (curl over the Unix socket). Installed from
# Debian when missing and we may; otherwise say what to install.
system-deps:
	@command -v curl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; \
	  else echo "make: the tests need curl; install it (e.g. sudo apt-get install curl)"; exit 1; fi; }
	@command -v systemd-analyze >/dev/null 2>&1 || [ "$$(uname)" != Linux ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; \
	  else echo "make: the tests check the unit files with systemd-analyze; install systemd"; exit 1; fi; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install bench-deps
	$(BIN)/python bench/store_bench.py
	$(BIN)/python bench/rpc_bench.py
	$(BIN)/python bench/sched_bench.py
	$(BIN)/python bench/exec_bench.py
	$(BIN)/python bench/maintenance_bench.py

# The peers exec_bench compares against: huey (PyPI) and task-spooler (Debian).
bench-deps: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check huey
	@command -v tsp >/dev/null 2>&1 || command -v ts >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq task-spooler >/dev/null; \
	  else echo "make: exec_bench compares with task-spooler; install it to see that figure"; fi; }

# systemd/ and launchd/ hold what semantica/service.py renders for the default paths.
service-files: install
	$(BIN)/python -m semantica.service .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
