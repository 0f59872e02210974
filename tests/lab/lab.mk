# Kernel lab (README.md, "The kernel lab"): Debian's kernel under qemu-system-x86_64 (TCG) for tests/kernel.
#   make lab-run CMD='dmsetup targets; exit 3'   boot, run CMD in the checkout; fails with CMD's status
#   make lab-shell                               interactive shell in the lab (Ctrl-A X kills qemu)
#   make test-kernel [PYTEST_ARGS='-k era']      pytest tests/kernel inside one boot
#   LAB_ARGS='--timeout 60 -v' adds harness options (see python3 tests/lab/lab.py run --help).
LAB ?= $(PYTHON) tests/lab/lab.py
LAB_ARGS ?=

.PHONY: lab-prepare lab-run lab-shell test-kernel lab-clean

lab-prepare:
	$(LAB) prepare

# CMD reaches the guest as typed: $(value) keeps make from expanding its $, and the environment keeps
# the shell from re-parsing it.
lab-run: export BLOCKTRACK_LAB_CMD := $(value CMD)
lab-run:
	@if [ -z "$$BLOCKTRACK_LAB_CMD" ]; then echo "usage: make lab-run CMD='shell command'" >&2; exit 2; fi
	$(LAB) run $(LAB_ARGS) -- "$$BLOCKTRACK_LAB_CMD"

lab-shell:
	$(LAB) shell $(LAB_ARGS)

test-kernel: build
	$(LAB) test-kernel $(LAB_ARGS) -- $(PYTEST_ARGS)

lab-clean:
	$(LAB) clean
