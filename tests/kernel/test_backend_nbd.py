"""The nbd backend in the kernel lab: what only it has -- a server process that can die, and the
kernel's NBD client between the LV and the hidden device.

The acceptance checks it shares with era and snapshot (a mounted ext4 enrolled live under a writer,
with every written chunk in every round's dirty set and ``unenroll`` restoring ``dmsetup table``
exactly, then ``fsck -n``; exact chunk sets on a raw LV, freeze/thaw and ``--since``; a failure at each
enroll step leaving nothing) run from test_backend_common.py, where "nbd" is in BACKENDS:
``make test-kernel PYTEST_ARGS='-k nbd tests/kernel/test_backend_common.py tests/kernel/test_backend_nbd.py'``.

Here: the server killed with SIGKILL after a SIGTERM it ignores (the workload gets EIO, never a
silent success; status says the server died and why; unenroll restores the table and the kernel
frees /dev/nbdN); failures and kills at the steps only this backend has (the server's start, inside
the server process); the daemon's self-protection as the kernel sees it (/proc: oom_score_adj,
VmLck, the nbd pid); data written through the server surviving unenroll; and an LV holding a
partitioned disk image, which must not appear again as /dev/nbdNpM on the host.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from pathlib import Path

from .backend_util import (VG, all_tables, bt, lvcreate, our_devices, our_volumes, report, vg,  # noqa: F401
                           write_chunks)
from .conftest import MiB, read_direct, run, settle, wait_for


def nbd_connected() -> dict[str, str]:
    """{nbdN: pid} for every connected kernel NBD device."""
    found = {}
    for pid_file in Path("/sys/block").glob("nbd*/pid"):
        try:
            found[pid_file.parent.name] = pid_file.read_text().strip()
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def server_processes() -> list[int]:
    """Every blocktrack nbd server process (by its command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"blocktrack.backends.nbd import daemon_main" in cmdline and alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def assert_nothing_left(bt, tables_before: str) -> None:
    assert all_tables() == tables_before
    assert our_devices() == [], "hidden devices left behind"
    assert our_volumes() == [], "helper volumes left behind"
    assert not list(bt.state_dir.glob("devices/*.json")), "a record left behind"
    wait_for(lambda: not server_processes(), "the nbd server processes to exit", timeout=60)
    wait_for(lambda: not nbd_connected(), "the kernel to free /dev/nbdN", timeout=60)


def direct_write(device: str, offset: int, size: int = 4096) -> subprocess.CompletedProcess:
    """A direct write in a child (a hang would be the bug, so it has a deadline)."""
    return run("dd", "if=/dev/urandom", f"of={device}", f"bs={size}", "count=1", f"seek={offset // size}",
               "oflag=direct", "conv=notrunc,fsync", "status=none", check=False, timeout=120)


def test_server_protects_itself_and_status_shows_it(bt):
    lv = lvcreate("raw", 64)
    before = all_tables()
    enrolled = bt.json("enroll", lv, "--backend", "nbd")
    assert enrolled["state"] == "tracking", enrolled
    nbd = enrolled["nbd"]
    pid = nbd["pid"]
    assert nbd["server"] == "running" and nbd["kernel_connected"], nbd
    rdev = os.stat(nbd["nbd_device"]).st_rdev
    assert nbd["nbd_devno"] == f"{os.major(rdev)}:{os.minor(rdev)}"
    assert f"{VG}-raw: 0 131072 linear {nbd['nbd_devno']} 0" in all_tables().splitlines(), all_tables()
    # The kernel side: the LV runs on /dev/nbdN, which device-mapper holds; the pid is a thread of the server.
    name = Path(nbd["nbd_device"]).name
    tid = int(Path(f"/sys/block/{name}/pid").read_text())
    assert Path(f"/proc/{pid}/task/{tid}").exists(), "NBD_DO_IT does not run in the server process"
    assert os.listdir(f"/sys/block/{name}/holders"), "device-mapper does not hold the nbd device"
    # Its protections as the kernel sees them.
    assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "-1000"
    proc_status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    locked_kib = int(proc_status["VmLck"].split()[0])
    assert locked_kib > 0, "mlockall did not lock anything"
    assert nbd["protections"] == {"io_flusher": True, "oom_score_adj": -1000, "mlockall": True}, nbd
    assert nbd["direct_io"] is True
    assert int(proc_status["PPid"]) != os.getpid(), "the server is not detached from the CLI"
    sid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    assert sid != os.getsid(0), "the server shares the CLI's session"
    write_chunks(lv, [2, 9])
    st = bt.json("status", lv)["devices"][0]
    assert st["dirty"] == 2 and st["nbd"]["requests"] > 0, st
    report("nbd-server", {"pid": pid, "vmlck_kib": locked_kib, "vmrss": proc_status["VmRSS"].strip(),
                          "threads": proc_status["Threads"].strip(), "nbd": st["nbd"]})
    bt.run("unenroll", lv)
    assert_nothing_left(bt, before)


def test_killed_server_gives_eio_and_unenroll_restores(bt):
    lv = lvcreate("raw", 64)
    before = all_tables()
    enrolled = bt.json("enroll", lv, "--backend", "nbd")
    pid, nbd_dev = enrolled["nbd"]["pid"], enrolled["nbd"]["nbd_device"]
    data = os.urandom(MiB)
    run("dd", f"of={lv}", "bs=1M", "seek=7", "count=1", "oflag=direct", "iflag=fullblock", "conv=notrunc,fsync",
        "status=none", input=data)
    assert bt.dirty(lv).dirty == {7}

    # A stray SIGTERM is ignored (stopping would fail the LV); only unenroll stops the server.
    os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)
    assert alive(pid), "the server stopped on SIGTERM under a live LV"
    assert direct_write(lv, 9 * MiB).returncode == 0
    assert bt.dirty(lv).dirty == {9}

    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), "the server to die")

    # The workload: an error, never a write that claims success and went nowhere.
    t0 = time.monotonic()
    write = direct_write(lv, 3 * MiB)
    elapsed = time.monotonic() - t0
    assert write.returncode != 0, "a write to the LV succeeded with its server dead"
    assert "Input/output error" in write.stderr, write.stderr
    read = run("dd", f"if={lv}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct", "status=none", check=False,
               timeout=120)
    assert read.returncode != 0 and "Input/output error" in read.stderr, read.stderr

    status = bt.json("status", lv)["devices"][0]
    assert status["state"] == "server-dead", status
    assert f"pid {pid}" in status["reason"] and "gone" in status["reason"], status
    assert status["nbd"]["server"] == "dead"
    dirty = bt.run("dirty", lv, "--json", check=False)
    assert dirty.returncode != 0 and "server" in dirty.stderr and "unenroll" in dirty.stderr, dirty.stderr
    human = bt.run("status").stdout
    assert "server-dead" in human, human

    result = bt.json("unenroll", lv)
    assert result["result"] == "ok", result
    assert_nothing_left(bt, before)
    assert not Path(f"/sys/block/{Path(nbd_dev).name}/pid").exists()
    # What the server acknowledged before it died is on the LV; the failed write changed nothing.
    assert read_direct(lv, 7 * MiB, MiB) == data
    assert read_direct(lv, 3 * MiB, 4096) == bytes(4096)
    report("nbd-killed", {"eio_after_s": round(elapsed, 2), "stderr": write.stderr.strip()[-200:],
                          "reason": status["reason"], "unenroll": result})


NBD_FAULTS = ["enroll.after-record", "enroll.after-hidden", "nbd.server.after-pid", "nbd.server.before-ready",
              "enroll.after-server", "enroll.after-load", "enroll.after-suspend", "enroll.after-resume",
              "enroll.after-save"]


def test_failures_at_the_server_steps_leave_nothing(bt, tmp_path):
    lv = lvcreate("vol", 64)
    run("mkfs.ext4", "-q", "-F", lv)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", lv, mnt)
    before = all_tables()
    outcomes = {}
    for point in NBD_FAULTS:
        proc = bt.run("enroll", lv, "--backend", "nbd", check=False, fault=point)
        assert proc.returncode != 0 and "fault injected" in proc.stderr, (point, proc.stderr)
        assert_nothing_left(bt, before)
        (mnt / f"after-{point}").write_text("writable\n")
        outcomes[point] = proc.returncode
    # The CLI killed (no undo runs) with the server already started: unenroll stops it and cleans up.
    for point in ("enroll.after-server", "enroll.after-load", "enroll.after-resume"):
        proc = bt.run("enroll", lv, "--backend", "nbd", check=False, fault=f"{point}=kill")
        assert proc.returncode == -9, proc.stderr
        status = bt.json("status")["devices"]
        assert [d["state"] for d in status] == ["enrolling"], status
        (mnt / f"killed-{point}").write_text("writable\n")
        bt.run("unenroll", lv)
        assert_nothing_left(bt, before)
    run("umount", mnt)
    fsck = run("fsck.ext4", "-n", "-f", lv, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    report("nbd-faults", outcomes)


def test_ext4_writes_through_the_server_survive_unenroll(bt, tmp_path):
    """Data written through the server is on the PVs: after unenroll (and a remount) it reads back."""
    lv = lvcreate("fs", 96)
    run("mkfs.ext4", "-q", "-F", lv)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", lv, mnt)
    before = all_tables()
    bt.json("enroll", lv, "--backend", "nbd")
    payload = os.urandom(8 * MiB)
    (mnt / "payload").write_bytes(payload)
    run("sync")
    r = bt.dirty(lv)
    assert r.dirty, "8 MiB written through the filesystem and no chunk dirty"
    bt.run("unenroll", lv)
    assert_nothing_left(bt, before)
    run("umount", mnt)
    run("mount", lv, mnt)
    assert (mnt / "payload").read_bytes() == payload
    run("umount", mnt)
    assert run("fsck.ext4", "-n", "-f", lv, check=False).returncode == 0
    report("nbd-ext4-roundtrip", {"dirty_chunks": len(r.dirty)})


def mbr(*parts: tuple[int, int]) -> bytes:
    """A DOS partition table: (first sector, sectors) per Linux partition."""
    sector = bytearray(512)
    for i, (first, count) in enumerate(parts):
        struct.pack_into("<B3sB3sII", sector, 446 + 16 * i, 0, b"\0\0\0", 0x83, b"\0\0\0", first, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def test_a_disk_image_lv_grows_no_partitions_on_the_host(bt):
    """A VM's disk on an LV holds a partition table. Device-mapper never scans one; the nbd driver does
    (max_part > 0): the server deletes what the scan made, so the host sees no nbdNpM."""
    lv = lvcreate("vmdisk", 64)
    table = mbr((2048, 32768), (34816, 32768)) + bytes(4096 - 512)
    run("dd", f"of={lv}", "bs=4096", "count=1", "oflag=direct", "conv=notrunc", "status=none", input=table)
    settle()
    before = all_tables()
    max_part = int(Path("/sys/module/nbd/parameters/max_part").read_text())
    enrolled = bt.json("enroll", lv, "--backend", "nbd")
    settle()
    name = Path(enrolled["nbd"]["nbd_device"]).name
    partitions = Path("/proc/partitions").read_text()
    assert f"{name}p" not in partitions, partitions
    if max_part:
        assert enrolled["nbd"]["partitions_dropped"] == [f"{name}p1", f"{name}p2"], enrolled["nbd"]
    write_chunks(lv, [40])
    assert bt.dirty(lv).dirty == {40}
    bt.run("unenroll", lv)
    assert_nothing_left(bt, before)
    assert read_direct(lv, 0, 4096) == table
    report("nbd-partitions", {"max_part": max_part, "dropped": enrolled["nbd"]["partitions_dropped"]})
