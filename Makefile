# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# the test-only node packages (package-lock.json: medplum's R4 validator, tests/fhir_validate.mjs)
NODE_STAMP := node_modules/.installed

.PHONY: run test lint install debian-packages clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## make run: the gateway on embedded SQLite + file store, with demo data (seeded once); node_modules holds the
## capture app's barcode reader
run: $(STAMP) $(NODE_STAMP)
	$(VENV)/bin/clinphoto demo
	$(VENV)/bin/clinphoto serve --welcome

## make test: lint, then the whole test suite (the same on a newcomer's machine as in CI)
test: $(STAMP) debian-packages $(NODE_STAMP) lint
	$(PY) -m pytest

# exactly the versions package-lock.json names; without npm the tests that need these skip (fail under CI) and say so,
# and the capture app falls back to typing the number
$(NODE_STAMP): package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  npm ci --no-audit --no-fund --loglevel=error && touch $(NODE_STAMP); \
	else \
	  echo "make test: npm not found, medplum's FHIR validator is not installed; install Node.js 20.19+ with npm" >&2; \
	fi

# The Debian tools the tests use (dcmtk, dciodvfy, jpegtran, exiftool, PostgreSQL server binaries...):
# installed when missing and we are root (CI is), else the exact command to install them is printed.
debian-packages:
	@missing=$$(for p in $$(grep -v '^#' .ci/debian-packages); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done | xargs); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages the tests need: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "make test: the tests that need these will be skipped; install them with:" >&2; \
	    echo "  sudo apt-get install -y --no-install-recommends $$missing" >&2; \
	  fi; \
	fi

## make lint: style, types (strict for gateway/core) and the direction of imports (wiring -> doors -> core -> store)
lint: $(STAMP)
	$(VENV)/bin/ruff check gateway mapping store tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis node_modules
