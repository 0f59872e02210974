# blocktrack: a thin make front over setup.py, pytest, the benchmarks and the kernel lab.
PYTHON ?= python3
# pytest exits 5 when it collected no test: that is a failure here, never a pass.
PYTEST = $(PYTHON) tests/run_pytest.py

.PHONY: all build builddeps deps pydeps test test-host test-unit demo bench bench-tracking bench-lab-converge fuzz clean install uninstall

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

# What building the C core needs from Debian beyond gcc and CPython's headers: libxxhash-dev (XXH3).
builddeps:
	@dpkg-query -W -f='$${Status}' libxxhash-dev 2>/dev/null | grep -q "install ok installed" || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libxxhash-dev; }

demo: builddeps pydeps build
	$(PYTHON) tools/demo.py

bench: build
	$(PYTHON) bench/copy_bench.py
	$(PYTHON) bench/converge_bench.py
	$(MAKE) --no-print-directory bench-tracking
	$(MAKE) --no-print-directory bench-lab-converge

# Live migration with the era and snapshot backends at 0/20/60 % writer rates, inside the kernel lab.
bench-lab-converge: build
	$(PYTHON) tests/lab/lab.py run --timeout 3000 -- python3 bench/lab_converge_bench.py

# Tracking overhead (era, snapshot vs the same LV untracked, fio) inside the kernel lab: its disks are scratch.
bench-tracking: build
	$(PYTHON) tests/lab/lab.py run --timeout 3000 -- python3 bench/tracking_bench.py $(TRACKING_BENCH_ARGS)

fuzz: build
	$(PYTHON) -m tests.host.fuzz_receiver --cases 100000

clean:
	rm -rf build *.egg-info blocktrack/_native*.so blocktrack/_native.c .pytest_cache

# Install the package (pip builds the C core), the udev rule, the systemd unit and the example policy;
# DESTDIR stages into a scratch root, PREFIX is where blocktrack lives on the target. uninstall removes
# exactly what install listed in $(PREFIX)/share/blocktrack/install-manifest.txt (same DESTDIR and PREFIX).
# PIP_FLAGS: the default builds with the host's setuptools and cffi and leaves dependencies to the host
# (make pydeps); PIP_FLAGS= lets pip fetch build tools and install the dependencies under PREFIX too.
PREFIX ?= /usr/local
DESTDIR ?=
UDEVRULESDIR ?= /lib/udev/rules.d
SYSTEMDUNITDIR ?= /lib/systemd/system
SYSCONFDIR ?= /etc
PIP_FLAGS ?= --no-deps --no-build-isolation
INSTALL_FILES = $(PYTHON) tools/install_files.py --destdir "$(DESTDIR)" --prefix "$(PREFIX)" \
	--udevrulesdir "$(UDEVRULESDIR)" --unitdir "$(SYSTEMDUNITDIR)" --sysconfdir "$(SYSCONFDIR)"

install:
	$(INSTALL_FILES) --pip-flags "$(PIP_FLAGS)" install
	@if [ -z "$(DESTDIR)" ] && command -v udevadm >/dev/null; then udevadm control --reload || true; fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi

uninstall:
	$(INSTALL_FILES) uninstall
	@if [ -z "$(DESTDIR)" ] && command -v udevadm >/dev/null; then udevadm control --reload || true; fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi

# Kernel lab targets (lab-run, lab-shell, test-kernel) live beside the harness.
include tests/lab/lab.mk
