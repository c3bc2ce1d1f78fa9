# The two set-up commands from the README: `make demo` and `make test`; `make image` builds
# the image (scripts/image) that tests/test_image.py and tests/test_pods.py run.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup demo test lint unit crds image

setup:
	./scripts/setup

demo: setup
	$(PYTHON) -m dynabase.cli demo

lint:
	ruff check .
	mypy
	lint-imports
	$(PYTHON) -m dynabase.cli crds --check

image: setup
	./scripts/image

# Without the image its tests are skipped, except in CI (CI=true), where a failed build fails.
# pytest exits 5 when it collected nothing; that is not a failure of the checks.
test: setup lint
	@./scripts/image || { [ "$$CI" != true ] && echo "warning: no image built; its container and pod tests will be skipped"; }
	$(PYTHON) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

crds:
	$(PYTHON) -m dynabase.cli crds
