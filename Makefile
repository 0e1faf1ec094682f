# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TOPOLOGY ?= topology.yaml

.PHONY: run test lint unit integration chaos bench clean lock

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/magasin run $(TOPOLOGY)

lint: $(STAMP)
	$(BIN)/ruff check runtime actors tests bench
	$(BIN)/ruff format --check runtime actors tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit tests/contracts -m 'not integration'

integration: $(STAMP)
	$(BIN)/pytest -m integration

chaos: $(STAMP)
	MAGASIN_CHAOS_LONG=1 $(BIN)/pytest -m chaos -v -rP

bench: $(STAMP)
	$(BIN)/python -m bench.store
	$(BIN)/python -m bench.flow
	$(BIN)/python -m bench.replay
	$(BIN)/python -m bench.e2e
	$(BIN)/python -m bench.micro

# Re-resolve the pinned versions (commit the result).
lock:
	rm -rf /tmp/magasin-lock && $(PYTHON) -m venv /tmp/magasin-lock
	/tmp/magasin-lock/bin/pip install --quiet '.[dev]'
	/tmp/magasin-lock/bin/pip freeze --exclude magasin > constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
