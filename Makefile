# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint install clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## make run: the gateway on embedded SQLite + file store, with demo data (seeded once)
run: $(STAMP)
	$(VENV)/bin/clinphoto demo
	$(VENV)/bin/clinphoto serve

## make test: the whole test suite
test: $(STAMP)
	$(PY) -m pytest

## make lint: style, types (strict for gateway/core) and the direction of imports (wiring -> doors -> core -> store)
lint: $(STAMP)
	$(VENV)/bin/ruff check gateway mapping store tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
