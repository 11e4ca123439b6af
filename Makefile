# Rigshift developer commands. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit lint format proto bench clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: install
	$(BIN)/rigshift demo

# Tests that start a Ray head inside the pytest process run in pytests of their own:
# in the shared process, tearing that head down after the other suites had run
# sometimes ended the whole run silently (see the closing note of the first session).
IN_PROCESS_RAY := tests/unit/test_agent_executor.py tests/unit/test_agent_ray_cluster.py

test: install
	$(BIN)/pytest -q $(addprefix --ignore=,$(IN_PROCESS_RAY))
	for f in $(IN_PROCESS_RAY); do $(BIN)/pytest -q $$f || exit 1; done

test-unit: install
	$(BIN)/pytest -q tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy broker

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: install
	$(BIN)/python scripts/gen_protos.py

# Lock file: regenerate with `make lock` after changing dependencies in pyproject.toml.
lock:
	uv pip compile pyproject.toml --extra test --python-version 3.11 --generate-hashes -o requirements.lock

bench: install
	$(BIN)/python benchmarks/scheduler_bench.py --workers 10000 --jobs 100000

clean:
	rm -rf $(VENV) .rigshift .pytest_cache .mypy_cache .ruff_cache
