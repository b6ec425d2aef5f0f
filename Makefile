# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: demo test test-shuffled lint bench record-fakes clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tunedeck needs Python 3.11 or newer: set PYTHON=python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tunedeck demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q --durations=40

# The same suite in a random order (modules shuffled, and the tests within each): no test may
# depend on another having run first. The seed is printed; TUNEDECK_TEST_ORDER=shuffle:SEED repeats it.
test-shuffled: lint
	TUNEDECK_TEST_ORDER=$${TUNEDECK_TEST_ORDER:-shuffle} $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/orchestration_overhead.py

# The dashboard's demo data, recorded from real runs on a real server (tui/providers/recorded.json)
record-fakes: $(STAMP)
	$(BIN)/python bench/record_fakes.py

clean:
	rm -rf $(VENV) .tunedeck
