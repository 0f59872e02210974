# blocktrack: thin make front over setup.py, pytest and the kernel lab.
PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest

.PHONY: all build test test-host test-unit clean

all: build

# Build the cffi extension in place (blocktrack/_native*.so) so the tree runs without installing.
build:
	$(PYTHON) setup.py -q build_ext --inplace

test-unit: build
	$(PYTEST) -q tests/unit

test-host: build
	$(PYTEST) -q tests/unit tests/host

clean:
	rm -rf build *.egg-info blocktrack/_native*.so blocktrack/_native.c .pytest_cache

# Kernel lab targets (lab-run, lab-shell, test-kernel) live beside the harness.
include tests/lab/lab.mk
