# blocktrack: a thin make front over setup.py, pytest, the benchmarks and the kernel lab.
PYTHON ?= python3
# pytest exits 5 when it collected no test: that is a failure here, never a pass.
PYTEST = $(PYTHON) tests/run_pytest.py

.PHONY: all build deps pydeps test test-host test-unit demo bench fuzz clean

all: build

# Build the cffi extension in place (blocktrack/_native*.so) so the tree runs without installing.
build:
	$(PYTHON) setup.py -q build_ext --inplace

# Debian and Python packages that building, the tests, the lab and the benchmarks need.
deps:
	bash tools/install-deps.sh

# The test command: host tests (unit, real files, loop devices, QEMU and NBD peers), then the
# kernel tests inside the kernel lab VM.
test: build
	$(PYTEST) -q tests/unit tests/host
	$(MAKE) test-kernel

test-unit: build
	$(PYTEST) -q tests/unit

test-host: build
	$(PYTEST) -q tests/unit tests/host

# The Python packages the tool itself needs (the demo needs nothing else: no root, no LVM).
pydeps:
	$(PYTHON) -m pip install -q --disable-pip-version-check "cffi>=1.15" "ioctl-opt>=1.2" "xxhash>=3" setuptools wheel

demo: pydeps build
	$(PYTHON) tools/demo.py

bench: build
	$(PYTHON) bench/copy_bench.py
	$(PYTHON) bench/converge_bench.py

fuzz: build
	$(PYTHON) -m tests.host.fuzz_receiver --cases 100000

clean:
	rm -rf build *.egg-info blocktrack/_native*.so blocktrack/_native.c .pytest_cache

# Kernel lab targets (lab-run, lab-shell, test-kernel) live beside the harness.
include tests/lab/lab.mk
