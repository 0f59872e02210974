"""What the kernel tests rely on from the lab itself (tests/lab): a Debian kernel with our modules, udev,
the host's tools and the project at its host path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .conftest import out, run


def test_the_lab_is_a_debian_kernel_with_udev_and_the_host_tools():
    release = os.uname().release
    assert release.endswith("-amd64") and release != os.environ["BLOCKTRACK_HOST_KERNEL"], release
    assert "Debian" in Path("/proc/version").read_text()
    for module in ("dm_mod", "dm_era", "dm_snapshot", "dm_persistent_data", "nbd", "loop", "overlay"):
        assert Path("/sys/module", module).is_dir(), f"module {module} not loaded"
    assert "era" in out("dmsetup", "targets")
    # switch_root, not a chroot: PID 1 shares our root, so kernel helpers (request_module) work.
    assert os.stat("/proc/1/root/").st_ino == os.stat("/").st_ino
    assert Path(f"/lib/modules/{release}/modules.dep").exists(), "the full module tree is not mounted"
    run("udevadm", "control", "--ping")          # systemd-udevd answers
    # The project at its host path, on the overlay; this python is the host's interpreter.
    assert Path(os.environ["BLOCKTRACK_PROJECT"], "tests", "kernel", "conftest.py").exists()
    assert Path(sys.executable).exists() and os.getcwd() == os.environ["BLOCKTRACK_PROJECT"]
