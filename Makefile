# Everything a fresh machine needs: `make demo` and `make test` create .venv and install
# the project with its pinned dependencies on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

# `make bench BENCH_ARGS="--images 500 --unet-weights DIR"`: see benchmarks/harness.py.
BENCH_ARGS ?=

.PHONY: install demo test bench clean

install: $(INSTALLED)

# The example outside model family (tests/example_family) is installed beside rayseg, as a
# user's own family would be: the tests and benchmarks find it through its entry point.
# setuptools tells every editable install, as a 9-line warning, that a folder named like
# the package may shadow it; here the folder *is* the package (package-dir), so the notice
# is dropped (PYTHONWARNINGS reaches the build backend) and every other warning stays.
EDITABLE := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet
$(INSTALLED): pyproject.toml tests/example_family/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(EDITABLE) -e ".[dev]"
	$(EDITABLE) --no-deps -e tests/example_family
	touch $@

demo: $(INSTALLED)
	$(BIN)/rayseg demo build/demo

test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(INSTALLED)
	$(BIN)/python -m benchmarks.harness $(BENCH_ARGS)

clean:
	rm -rf build .pytest_cache
