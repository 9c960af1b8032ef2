# Two set-up commands on a fresh clone: `make run` (install + run the worker in local mode)
# and `make test` (install + the whole test suite). Everything else is optional.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
UV     := $(BIN)/uv

.PHONY: run test pubsub-emulator install install-dev lint lock bench campaigns-small campaigns-ci campaigns-full clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==0.13.9

# The pins, then the worker itself in editable mode: .venv/bin/transfer-worker runs this clone's
# transfer_worker.py as it is edited (`pip install .` elsewhere gives the same command).
$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(UV) pip install --quiet --python $(BIN)/python -r requirements.txt
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt pyproject.toml | $(BIN)/python
	$(UV) pip install --quiet --python $(BIN)/python -r requirements.txt -r requirements-dev.txt
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Ctrl-C: the worker finishes what is under way and exits 0. A second Ctrl-C stops it at once, exit
# 130, which is the operator's choice, not a failure: the trap keeps the shell waiting for the
# worker rather than dying with it, and make says nothing of either. Other exits still fail.
run: install
	@echo '$(BIN)/transfer-worker run'
	@trap : INT; $(BIN)/transfer-worker run || { status=$$?; [ $$status -eq 130 ] || exit $$status; }

test: install-dev
	$(BIN)/python -m pytest

# The Pub/Sub emulator as the tests run it, patched so that it keeps delivering after a subscriber
# stops (tools/pubsub_emulator.py says why). Ctrl-C stops it and its java process.
PORT ?= 8085
pubsub-emulator: | $(BIN)/python
	$(BIN)/python tools/pubsub_emulator.py --port $(PORT)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check transfer_worker.py
	$(BIN)/mypy transfer_worker.py

lock: | $(BIN)/python
	$(UV) pip compile --quiet requirements.in -o requirements.txt
	$(UV) pip compile --quiet requirements-dev.in -o requirements-dev.txt

bench: install-dev
	cd bench && ../$(BIN)/python local_large.py && ../$(BIN)/python local_small.py

# Reliability campaigns (tests/campaigns, figures in RELIABILITY.md): small in CI, full by hand.
campaigns-small: install-dev
	$(BIN)/python -m tests.campaigns.run --size small

# CI runs the small set without rewriting RELIABILITY.md.
campaigns-ci: install-dev
	$(BIN)/python -m tests.campaigns.run --size small --no-write

campaigns-full: install-dev
	$(BIN)/python -m tests.campaigns.run --size full

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build transfer_worker.egg-info
