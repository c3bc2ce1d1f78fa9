# The two set-up commands from the README: `make demo` and `make test`.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup demo test lint unit crds

setup:
	./scripts/setup

demo: setup
	$(PYTHON) -m dynabase.cli demo

lint:
	ruff check .
	mypy
	lint-imports
	$(PYTHON) -m dynabase.cli crds --check

# pytest exits 5 when it collected nothing; that is not a failure of the checks.
test: setup lint
	$(PYTHON) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

crds:
	$(PYTHON) -m dynabase.cli crds
