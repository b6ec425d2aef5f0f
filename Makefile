# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# No .pyc for all 20,000 installed files where Python writes one when a module is first imported (58 s against 128 s
# for a fresh install; the modules the suite imports then cost about 16 s once, 2026-12-07). Where it may not
# (PYTHONDONTWRITEBYTECODE set, as in many container images) every process would compile them again: compile here.
PIP_COMPILE := $(if $(PYTHONDONTWRITEBYTECODE),,--no-compile)
export PATH := $(BIN):$(PATH)

.PHONY: demo test test-fast lint bench record-fakes clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tunedeck needs Python 3.11 or newer: set PYTHON=python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_COMPILE) -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tunedeck demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir .tunedeck/site

# The whole suite, in a random order every time (modules shuffled, and the tests within each): no
# test may depend on another having run first. The header prints the seed; TUNEDECK_TEST_ORDER=shuffle:SEED
# repeats an order, TUNEDECK_TEST_ORDER=written runs file order. Under CI=true a skipped test fails.
# Tests marked gpu need a CUDA GPU: bench/gpu_check.sh runs them on one. TEST_JOBS pytest-xdist workers
# (each module whole on one worker) run side by side: much of an integration test is waiting on a server,
# a worker or a process starting. TEST_JOBS=0 runs everything in this one process.
TEST_JOBS ?= 2
# --no-loadscope-reorder: xdist would hand out the modules with the most tests first, the unit modules, and
# leave the slow ones (one or two tests of minutes each) to the end, one worker idle while the other finishes.
PYTEST := $(BIN)/python -m pytest -q -rs -m "not gpu" -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder
test: lint
	TUNEDECK_TEST_ORDER=$${TUNEDECK_TEST_ORDER:-shuffle} $(PYTEST) --durations=40

# The unit tier alone (pure functions, tiny timm models, no server): the quick loop while editing.
test-fast: $(STAMP)
	TUNEDECK_TEST_ORDER=$${TUNEDECK_TEST_ORDER:-shuffle} $(PYTEST) -m "not gpu and not slow" tests/unit

bench: $(STAMP)
	$(BIN)/python bench/orchestration_overhead.py

# The dashboard's demo data, recorded from real runs on a real server (tui/providers/recorded.json)
record-fakes: $(STAMP)
	$(BIN)/python bench/record_fakes.py

clean:
	rm -rf $(VENV) .tunedeck
