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

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(INSTALLED)
	$(BIN)/rayseg demo build/demo

test: $(INSTALLED)
	$(BIN)/python -m pytest

bench: $(INSTALLED)
	$(BIN)/python -m benchmarks.harness $(BENCH_ARGS)

clean:
	rm -rf build .pytest_cache
