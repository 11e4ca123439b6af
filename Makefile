# Rigshift developer commands. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-ray lint format proto lock bench clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: install
	$(BIN)/rigshift demo

# The test tiers are described in tests/README.md. tests/ray starts Ray: each of its files
# runs in a pytest of its own, after the rest, because Ray allows one driver per process
# and tearing an in-process head down after the other suites had run sometimes ended the
# whole run silently.
RAY_TESTS := $(sort $(wildcard tests/ray/test_*.py))

test: install
	$(BIN)/pytest -q --durations=15 --ignore=tests/ray
	$(MAKE) --no-print-directory test-ray

test-unit: install
	$(BIN)/pytest -q tests/unit

test-ray: install
	for f in $(RAY_TESTS); do $(BIN)/pytest -q $$f || exit 1; done

# mypy's settings are in pyproject.toml (untyped defs refused, unused ignores reported).
MYPY_PACKAGES := broker worker_agent client rigshift harness rigshift_cli

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(MYPY_PACKAGES)

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: install
	$(BIN)/python scripts/gen_protos.py

# Lock file: regenerate with `make lock` after changing dependencies in pyproject.toml.
lock:
	uv pip compile pyproject.toml --extra test --extra bench --python-version 3.11 --generate-hashes -o requirements.lock

bench: install
	$(BIN)/python benchmarks/scheduler_bench.py --workers 10000 --jobs 100000

clean:
	rm -rf $(VENV) .rigshift .pytest_cache .mypy_cache .ruff_cache
