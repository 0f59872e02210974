"""Fixtures for the kernel tests: they run inside the kernel lab (tests/lab), the whole session in one boot.

Run them with ``make test-kernel`` (``python3 tests/lab/lab.py test-kernel``). Outside the lab every test
errors at setup (they are not skipped): this folder is not in the host's pytest testpaths.

The lab gives two blank 2 GiB virtio disks, /dev/vda and /dev/vdb, a running systemd-udevd, and the modules
dm-mod, dm-era, dm-snapshot, dm-flakey, nbd, loop (others load on demand). ``clean_disks`` hands a test the
disks with no dm/LVM/loop/nbd state and zeroed contents, and removes whatever the test left.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

IN_LAB = os.environ.get("BLOCKTRACK_LAB") == "1"
DISKS = ("/dev/vda", "/dev/vdb")
SECTOR = 512
MiB = 1 << 20
HERE = Path(__file__).resolve().parent

# lvm prints "File descriptor N leaked" when pytest's descriptors are inherited.
os.environ.setdefault("LVM_SUPPRESS_FD_WARNINGS", "1")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)


class CommandFailed(AssertionError):
    pass


def run(*args, check: bool = True, input: bytes | str | None = None, timeout: float = 300,
        **kw) -> subprocess.CompletedProcess:
    """Run a command (argv words, or one shell string); with ``check``, fail with its output."""
    if len(args) == 1 and isinstance(args[0], str):
        argv = ["sh", "-c", args[0]]
    else:
        argv = [str(a) for a in args]
    text = not isinstance(input, bytes)
    proc = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise CommandFailed(f"{shlex.join(argv)} exited {proc.returncode}\n"
                            f"stdout: {proc.stdout!s:.3000}\nstderr: {proc.stderr!s:.3000}")
    return proc


def out(*args, **kw) -> str:
    return run(*args, **kw).stdout.strip()


def settle() -> None:
    run("udevadm", "settle", "--timeout=120")


def dm_remove(name: str) -> None:
    """``dmsetup remove`` as LVM does it: once udev has settled, and retried while the device is
    busy. udev's probe (blkid) of a device that was just written or changed opens it for a moment,
    and a remove in that moment fails with EBUSY ("Device or resource busy"): that made
    test_era_tracks_through_sigkill_and_reboot flaky. dmsetup's own --retry retries for a few
    seconds; blocktrack's kernel.dm.remove does the same for the product."""
    settle()
    run("dmsetup", "remove", "--retry", name)


def wait_for(predicate, what: str, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def size_bytes(dev: str) -> int:
    return int(out("blockdev", "--getsize64", dev))


def read_direct(dev: str, offset: int, length: int) -> bytes:
    """Read with O_DIRECT (past the page cache), offset and length multiples of 4 KiB."""
    assert offset % 4096 == 0 and length % 4096 == 0
    buf = mmap.mmap(-1, length)                 # page aligned, as O_DIRECT wants
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        done = 0
        while done < length:
            n = os.preadv(fd, [memoryview(buf)[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read from {dev} at {offset + done}")
            done += n
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


def dd_write(dev: str, data: bytes, offset: int) -> None:
    """A direct write of ``data`` at ``offset`` with dd (oflag=direct), like an application doing O_DIRECT."""
    assert offset % 4096 == 0 and len(data) % 4096 == 0
    run("dd", f"of={dev}", "bs=4096", f"seek={offset // 4096}", f"count={len(data) // 4096}", "oflag=direct",
        "iflag=fullblock", "conv=notrunc", "status=none", input=data)


# --------------------------------------------------------------------------------------------------
# Kernel state: left clean between tests

def _mounted_block_devices() -> list[str]:
    targets = []
    with open("/proc/self/mounts") as f:
        for line in f:
            src, target = line.split()[:2]
            if src.startswith(("/dev/vd", "/dev/mapper/", "/dev/dm-", "/dev/nbd", "/dev/loop")):
                targets.append(target.encode().decode("unicode_escape"))
    return targets


def reset_kernel_state() -> None:
    """Unmount, disconnect and remove everything the tests may create; zero the disks."""
    for target in reversed(_mounted_block_devices()):
        run("umount", target, check=False)
    for pidfile in glob.glob("/sys/block/nbd*/pid"):
        run("nbd-client", "-d", "/dev/" + pidfile.split("/")[3], check=False)
    vgs = out("vgs", "--noheadings", "-o", "vg_name", check=False).split()
    for vg in vgs:
        run("vgremove", "-ff", "-y", vg, check=False)
    if out("dmsetup", "ls", check=False) not in ("", "No devices found"):
        run("dmsetup", "remove_all", "--force", check=False)
    run("losetup", "-D", check=False)
    settle()
    leftover = out("dmsetup", "ls", check=False)
    assert leftover in ("", "No devices found"), f"dm devices left after cleanup: {leftover}"
    for disk in DISKS:
        # Write-zeroes with unmap: qemu punches holes in the sparse images (fast, and really zero).
        run("blkdiscard", "-f", "-z", disk)
    settle()


@pytest.fixture(scope="session", autouse=True)
def lab():
    """The lab itself: fails every test clearly when not inside it; waits for udev's coldplug."""
    if not IN_LAB:
        pytest.fail("tests/kernel runs only inside the kernel lab (BLOCKTRACK_LAB=1 is not set): "
                    "run `make test-kernel`", pytrace=False)
    results = os.environ.get("BLOCKTRACK_LAB_OUT")
    if results:                                  # lab.py reports boot-to-first-test from this
        Path(results, "first_test_uptime").write_text(Path("/proc/uptime").read_text().split()[0])
    t0 = time.monotonic()
    # lab.py test-kernel starts pytest while udev starts: wait until the coldplug is queued, then settle.
    flag = os.environ.get("BLOCKTRACK_LAB_UDEV_FLAG")
    if flag:
        wait_for(lambda: Path(flag).exists(), "the lab's udev coldplug", timeout=120)
    settle()
    for disk in DISKS:
        assert Path(disk).is_block_device(), f"{disk} missing: is the lab booted with its two disks?"
        assert size_bytes(disk) == 2 << 30, f"{disk} is not 2 GiB"
    assert Path("/run/udev/control").exists(), "systemd-udevd is not running in the lab"
    # The lab boots with blank disks and no dm/LVM/nbd state: no reset needed before the first test.
    info = {"kernel": os.uname().release, "udev_settle_s": round(time.monotonic() - t0, 2)}
    if results:
        Path(results, "lab-info.json").write_text(json.dumps(info) + "\n")
    yield info
    reset_kernel_state()


@pytest.fixture
def clean_disks():
    """/dev/vda and /dev/vdb zeroed and unused; anything the test leaves is removed afterwards."""
    yield DISKS
    reset_kernel_state()
