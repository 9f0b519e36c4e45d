# Set-up is two commands on a fresh machine: `make demo` and `make test`.
# Each bootstraps .venv with pip (pip finds the torch wheels on this machine; uv/poetry don't).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint format install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded default; each demo is a new run (nothing earlier is overwritten).
demo: $(STAMP)
	$(BIN)/kdsearch space show search_spaces/digits_quick.yaml
	$(BIN)/kdsearch search search_spaces/digits_quick.yaml --name digits_quick-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25  # the slowest tests in every log: the suite stays under 20 minutes

# ruff (settings in pyproject.toml): lint, and check that every file is formatted
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
