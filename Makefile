# One-command set-up on a fresh machine: `make demo` and `make test` create .venv and install everything.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3.11
# pip on some machines warns about every missing local index folder; hide that noise, keep pip's exit status
QUIET_PIP := { grep -v "^WARNING: Location" || true; }
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export HF_HUB_OFFLINE := 1
export SENTRY_OPT_OUT := 1

.PHONY: demo test lint weights fastdup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e . 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import anomalib_ext"
	$(BIN)/anomalib-ext-weights install
	touch $@

# The tests also exercise the optional fastdup backend, so the test environment installs it (see `fastdup`).
$(DEV_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev]" 2>&1 | $(QUIET_PIP)
	$(MAKE) --no-print-directory fastdup
	touch $@

weights: $(STAMP)
	$(BIN)/anomalib-ext-weights install

# fastdup is non-commercial and pins numpy<2/Pillow 10.3, so it goes in without its pins (see README).
fastdup: $(STAMP)
	$(BIN)/pip install --quiet --no-deps fastdup==2.54 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install --quiet requests pillow_heif sentry-sdk 2>&1 | $(QUIET_PIP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py

# One pytest worker per core, at most 4 (each worker holds torch and a few trained models: about 2 GB), whole test
# files per worker (their module fixtures train once); tests/conftest.py shares the cores' threads among workers.
TEST_WORKERS ?= $(shell python3 -c "import os; print(min(4, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1))")

test: $(DEV_STAMP)
	$(BIN)/ruff check anomalib_ext tools tests
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile tests

lint: $(DEV_STAMP)
	$(BIN)/ruff check anomalib_ext tools tests
	$(BIN)/ruff format --check anomalib_ext tools tests

clean:
	rm -rf $(VENV) build *.egg-info
