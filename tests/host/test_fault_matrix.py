"""The fault matrix of a live migration: each case ends in a verified success (the target compared
byte for byte with the frozen source) or in a clear failure, exit status non-zero on both ends, with
the target marked incomplete in the receiver's state — never "success" with a difference.

| case                                   | test                                                        |
| -------------------------------------- | ----------------------------------------------------------- |
| network stall (proxy stops forwarding) | test_stall_is_detected_then_resume                          |
| connection reset (RST) mid-stream      | test_reset_then_resume                                      |
| connection cut (FIN) mid-chunk         | test_migrate_faults.py::test_connection_cut_mid_chunk_then_resume |
| slow receiver (rate-limited proxy)     | test_slow_link_is_not_a_stall                               |
| full target (ENOSPC, small tmpfs)      | test_full_target                                            |
| full target, state folder on it too    | test_full_target_with_its_state_folder_on_it                |
| ... and no room left even for a record | test_a_record_that_cannot_be_saved_never_hides_the_first_error |
| target I/O error (EIO at pwrite)       | test_target_io_error                                        |
| source lost mid-pass (bulk, dirty)     | test_source_lost_mid_pass                                   |
| sender killed, resumed                 | test_migrate_faults.py::test_sender_killed_then_resume      |
| receiver killed                        | test_migrate_faults.py::test_receiver_killed                |
| both ends killed, resumed              | test_both_ends_killed_then_resume                           |
| smaller target                         | test_migrate_faults.py::test_smaller_target_is_refused_before_any_data |

The stall timeout is 3 s here (default 60) so a stall is found quickly; the slow-link case runs with
the same timeout to show a slow but moving peer is not taken for a stalled one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from blocktrack.migrate.savedstate import (RESERVED_ROOM, SourceState, TargetState, source_folder, state_root,
                                           target_folder)
from blocktrack.migrate.scenario import WAIT, sha256, start_migrate, start_receiver, start_writer
from tests.conftest import MiB, blank_image, write_image
from tests.host.net_helpers import FaultProxy
from tests.host.test_migrate_faults import _bulk_progress, _finish

STALL = "3"
LINK = 8 * MiB


def _target_status(state, target) -> str:
    return TargetState.load(target_folder(state_root(str(state)), str(target))).status


def _source_phase(state, source) -> str:
    return SourceState.load(source_folder(state_root(str(state)), str(source))).phase


def _failed_clearly(proc, codes, *words) -> None:
    code = proc.wait()
    assert code in codes, (code, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not proc.named("summary") and not proc.named("frozen"), proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("blocktrack: error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]


def _verified(migrate, receiver, source, target, state) -> dict:
    """A verified cutover, the frozen source identical to the target, and the receiver's state says so."""
    summary = _finish(migrate, receiver, source, target, state)
    assert _target_status(state, target) == "verified"
    return summary


def _resume(source, target, state, sock) -> dict:
    receiver, port = start_receiver([f"src.img={target}"], state, "--stall-timeout", STALL)
    migrate = start_migrate(source, port, sock, state, "--resume", "--stall-timeout", STALL)
    connected = migrate.wait_event("connected")
    assert connected["resume"] and connected["held_chunks"] > 0
    summary = _verified(migrate, receiver, source, target, state)
    assert summary["resumed"] and summary["chunks_sent"] < 24
    return summary


def test_stall_is_detected_then_resume(tmp_path):
    source = write_image(tmp_path / "src.img", 24 * MiB, seed=31)
    target = blank_image(tmp_path / "dst.img", 24 * MiB)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state, "--stall-timeout", STALL)
    proxy = FaultProxy(port, stall_after=6 * MiB + 4321)
    migrate = start_migrate(source, proxy.address, sock, state, "--rate-limit", LINK, "--stall-timeout", STALL)
    try:
        assert proxy.stalled.wait(WAIT)
        stalled_at = time.monotonic()
        _failed_clearly(migrate, (5,), "stall")
        _failed_clearly(receiver, (5,), "stalled", "--stall-timeout", "--resume")
        # Found within the stall timeout and the time to fill the buffers, not after minutes.
        assert time.monotonic() - stalled_at < 3 + 15
    finally:
        proxy.close()
    assert _target_status(state, target) == "interrupted"
    assert _source_phase(state, source) == "interrupted"
    _resume(source, target, state, sock)


def test_reset_then_resume(tmp_path):
    source = write_image(tmp_path / "src.img", 24 * MiB, seed=32)
    target = write_image(tmp_path / "dst.img", 24 * MiB, seed=33)  # stale contents
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state, "--stall-timeout", STALL)
    proxy = FaultProxy(port, reset_after=9 * MiB + 77777)
    migrate = start_migrate(source, proxy.address, sock, state, "--rate-limit", LINK, "--stall-timeout", STALL)
    try:
        _failed_clearly(migrate, (5,), "receiver")
        _failed_clearly(receiver, (3, 5), "--resume")
        assert proxy.reset.is_set()
    finally:
        proxy.close()
    assert _target_status(state, target) == "interrupted"
    _resume(source, target, state, sock)


def test_slow_link_is_not_a_stall(tmp_path):
    size = 12 * MiB
    source = write_image(tmp_path / "src.img", size, seed=34)
    target = blank_image(tmp_path / "dst.img", size)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state, "--stall-timeout", STALL)
    rate = 3 * MiB
    proxy = FaultProxy(port, rate=rate)
    started = time.monotonic()
    migrate = start_migrate(source, proxy.address, sock, state, "--stall-timeout", STALL)
    writer = start_writer(sock, 0.05 * rate, seed=5)
    try:
        summary = _verified(migrate, receiver, source, target, state)
    finally:
        writer.stop()
        proxy.close()
    assert time.monotonic() - started >= size / rate * 0.8  # it was slow, and never taken for a stall
    assert summary["chunks_sent"] >= 12


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 6 MiB tmpfs (mount needs root; CI runs the host tests as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_target(tmp_path, small_tmpfs):
    """ENOSPC on the target: the receiver stops at the failing write and says so; the sender reports
    the receiver's error; the target's state says incomplete."""
    source = write_image(tmp_path / "src.img", 16 * MiB, seed=35)
    target = blank_image(small_tmpfs / "dst.img", 16 * MiB)  # sparse: fits the size check, not the data
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state, "--stall-timeout", STALL)
    migrate = start_migrate(source, port, sock, state, "--stall-timeout", STALL)
    _failed_clearly(receiver, (4,), "No space left on device")
    _failed_clearly(migrate, (5,), "the receiver failed", "No space left on device")
    assert _target_status(state, target) == "interrupted"
    assert sha256(source) != sha256(target)


def test_full_target_with_its_state_folder_on_it(tmp_path, small_tmpfs):
    """The receiver's state folder on the filesystem its target fills up (/var/lib/blocktrack and an
    image file on one root filesystem): the first error, ENOSPC writing the target, is the one
    reported (not a failure to save the record afterwards), and the target's record still says
    "interrupted" although the filesystem is full."""
    source = write_image(tmp_path / "src.img", 16 * MiB, seed=36)
    target = blank_image(small_tmpfs / "dst.img", 16 * MiB)
    state, sock = small_tmpfs / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state, "--stall-timeout", STALL)
    migrate = start_migrate(source, port, sock, tmp_path / "sender-state", "--stall-timeout", STALL)
    _failed_clearly(receiver, (4,), "No space left on device", f"on {target}")
    _failed_clearly(migrate, (5,), "the receiver failed", "No space left on device")
    assert "save migration state" not in receiver.stderr
    fs = os.statvfs(small_tmpfs)
    assert fs.f_bavail * fs.f_frsize <= RESERVED_ROOM             # full, but for the room given back
    assert _target_status(state, target) == "interrupted"
    record = TargetState.load(target_folder(state_root(str(state)), str(target)))
    assert "No space left on device" in record.error, record     # the record says why, for the resume


def test_a_record_that_cannot_be_saved_never_hides_the_first_error(tmp_path, small_tmpfs):
    """The worst case of the one above, in-process: the state folder's filesystem is full and no
    room was kept (nothing to give back). The clean-up after the target's ENOSPC cannot save the
    record; the error raised is still the first one, with that added to its message."""
    import errno
    import socket

    from blocktrack.dirtymap import DirtyMap
    from blocktrack.errors import IOFailure
    from blocktrack.migrate.live_receiver import _Connection, _interrupted
    from blocktrack.migrate.savedstate import make_folder
    from blocktrack.migrate.receiver import _Target
    from blocktrack.migrate.sender import DeviceSpec
    from blocktrack.transport import SocketChannel

    target = _Target(DeviceSpec("disk", str(write_image(tmp_path / "dst.img", 4 * MiB))), 2, MiB)
    folder = make_folder(target_folder(state_root(str(small_tmpfs / "state")), str(tmp_path / "dst.img")))
    state = TargetState("ef" * 16, "disk", str(tmp_path / "dst.img"), 4 * MiB, MiB)
    state.save(folder)
    fd = os.open(small_tmpfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)   # fill it to the last block
    try:
        while os.write(fd, bytes(64 << 10)):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    ours, theirs = socket.socketpair()
    first = IOFailure(errno.ENOSPC, "write", str(tmp_path / "dst.img"), 3 * MiB)
    try:
        _interrupted(target, DirtyMap(4, MiB), state, folder, _Connection(SocketChannel(ours, "test",
                     stall_timeout=5), 8), first)
    finally:
        target.writer.abort()
        theirs.close()
        ours.close()
    assert first.errno == errno.ENOSPC and str(first).startswith(f"write on {tmp_path / 'dst.img'} at byte")
    assert "the target's record could not be updated and still says 'receiving'" in str(first), str(first)
    assert TargetState.load(folder).status == "receiving"


EIO_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

/* pwrite() fails with EIO on one file (by inode) at or past one offset: a target whose disk fails. */
static int failing(int fd, off_t off)
{
    const char *ino = getenv("BT_EIO_INODE"), *after = getenv("BT_EIO_AFTER");
    struct stat st;
    return ino && after && fstat(fd, &st) == 0 && (unsigned long long)st.st_ino == strtoull(ino, 0, 10)
           && (unsigned long long)off >= strtoull(after, 0, 10);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off)
{
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real)
        real = (ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite64");
    if (failing(fd, off)) {
        errno = EIO;
        return -1;
    }
    return real(fd, buf, n, off);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) { return pwrite64(fd, buf, n, off); }
"""


def test_target_io_error(tmp_path, monkeypatch):
    """EIO from the target's writes in the middle of the stream (an LD_PRELOAD shim at pwrite(); a real
    failing disk, dm-error, is a kernel-lab case)."""
    shim_c = tmp_path / "eio.c"
    shim_c.write_text(EIO_SHIM)
    shim = tmp_path / "eio.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(shim_c), "-ldl"], check=True)
    source = write_image(tmp_path / "src.img", 16 * MiB, seed=36)
    target = blank_image(tmp_path / "dst.img", 16 * MiB)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    monkeypatch.setenv("LD_PRELOAD", str(shim))
    monkeypatch.setenv("BT_EIO_INODE", str(target.stat().st_ino))
    monkeypatch.setenv("BT_EIO_AFTER", str(5 * MiB))
    receiver, port = start_receiver([f"src.img={target}"], state, "--stall-timeout", STALL)
    for name in ("LD_PRELOAD", "BT_EIO_INODE", "BT_EIO_AFTER"):
        monkeypatch.delenv(name)
    migrate = start_migrate(source, port, sock, state, "--stall-timeout", STALL)
    _failed_clearly(receiver, (4,), "Input/output error", str(target))
    _failed_clearly(migrate, (5,), "the receiver failed", "Input/output error")
    assert _target_status(state, target) == "interrupted"


@pytest.mark.parametrize("phase", ["bulk", "dirty"])
def test_source_lost_mid_pass(tmp_path, phase):
    """The source goes away under the sender (its image cut short, as a lost disk would read): the
    sender fails on a short read, or at the cutover's check of the source's size (the loss changed no
    chunk through the tracker, so the final part alone would "verify" nothing); the receiver sees a
    stream without its end. Neither reports success."""
    size = 24 * MiB
    source = write_image(tmp_path / "src.img", size, seed=37)
    target = blank_image(tmp_path / "dst.img", size)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state, "--stall-timeout", STALL)
    migrate = start_migrate(source, port, sock, state, "--rate-limit", 4 * MiB, "--stall-timeout", STALL)
    writer = None
    try:
        if phase == "bulk":
            _bulk_progress(migrate, 6 * MiB)
        else:
            migrate.wait_event("serving")
            writer = start_writer(sock, 0.5 * 4 * MiB, seed=7, max_write=64 << 10)
            migrate.wait_event(lambda e: e.get("event") == "pass" and e["pass"] >= 1)
        os.truncate(source, 2 * MiB)
        _failed_clearly(migrate, (1, 3, 4, 5), str(source))
    finally:
        if writer is not None:
            writer.stop()
    _failed_clearly(receiver, (3, 5), "--resume")
    assert _target_status(state, target) == "interrupted"
    # A resume is refused too: the device is not the size it had when the migration started.
    again = start_migrate(source, port, sock, state, "--resume")
    assert again.wait() == 2 and "bytes now" in again.stderr


def test_both_ends_killed_then_resume(tmp_path):
    size = 24 * MiB
    source = write_image(tmp_path / "src.img", size, seed=38)
    target = blank_image(tmp_path / "dst.img", size)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state)
    migrate = start_migrate(source, port, sock, state, "--rate-limit", LINK)
    migrate.wait_event("serving")
    writer = start_writer(sock, 0.2 * LINK, seed=6)
    try:
        _bulk_progress(migrate, 10 * MiB)
        receiver.proc.send_signal(signal.SIGKILL)
        migrate.proc.send_signal(signal.SIGKILL)
        receiver.wait()
        migrate.wait()
        assert not receiver.named("summary") and not migrate.named("summary")
        # Neither end ever wrote success; both saved states say unfinished.
        assert _target_status(state, target) == "receiving"
        saved = SourceState.load(source_folder(state_root(str(state)), str(source)))
        assert saved.bulk_cursor > 0 and saved.phase in ("bulk", "dirty")
        assert sha256(source) != sha256(target)

        receiver, port = start_receiver([f"src.img={target}"], state)
        migrate = start_migrate(source, port, sock, state, "--resume", "--rate-limit", LINK)
        connected = migrate.wait_event("connected")
        assert connected["resume"] and connected["attempt"] == 2 and connected["held_chunks"] > 0
        summary = _verified(migrate, receiver, source, target, state)
    finally:
        writer.stop()
    assert summary["resumed"] and summary["chunks_sent"] < 24 + summary["final_chunks"] + 16
