"""The snapshot backend: when the COW exception table on disk is complete, overflow, interrupted passes."""

from __future__ import annotations

import mmap
import os
import threading

from blocktrack.kernel.snapshot_cow import parse_exceptions, parse_header

from .backend_util import CHUNK, all_tables, bt, lvcreate, report, vg, write_chunks  # noqa: F401
from .conftest import read_direct, size_bytes


def cow_path(bt_status: dict) -> str:
    snap = bt_status["snapshot"]
    slot = snap["active"]["slot"]
    return f"/dev/{snap['cow_volumes'][slot]}"


def buffered_read(dev: str, offset: int, length: int) -> bytes:
    with open(dev, "rb") as f:
        f.seek(offset)
        return f.read(length)


def table_olds(read, cow: str) -> set[int]:
    header = parse_header(read(0, 4096))
    cb = header.chunk_bytes
    table = parse_exceptions(header, lambda c: read(c * cb, cb), size_bytes(cow) // cb)
    return set(table.old_chunks())


def test_cow_table_is_complete_on_disk_once_writes_return(bt):
    """The finding behind the snapshot backend: a write to the origin returns only after its exception
    is on disk, so an O_DIRECT read of the table right after the write lists it (no suspend, no dm
    call); a buffered read does not (the kernel writes the COW with bios, past the page cache); and
    many writes in flight at once are all listed once they have all returned."""
    lv = lvcreate("raw", 64)
    status = bt.json("enroll", lv, "--backend", "snapshot", "--snapshot-chunk", "64")
    cow = cow_path(status)
    direct = lambda off, n: read_direct(cow, off, n)                  # noqa: E731
    buffered = lambda off, n: buffered_read(cow, off, n)             # noqa: E731
    assert table_olds(direct, cow) == set() and table_olds(buffered, cow) == set()   # page cache now holds area 0

    write_chunks(lv, [7])                                            # 4 KiB at 7 MiB: COW chunk 112
    assert table_olds(direct, cow) == {7 * 16}
    stale = table_olds(buffered, cow)
    assert stale == set(), "a buffered read saw the new exception: the page cache was invalidated"

    # 32 writers at once, each to its own chunk; when all have returned, all are on disk.
    chunks = list(range(20, 52))
    errors = []

    def one(c):
        try:
            fd = os.open(lv, os.O_WRONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, 65536)
            try:
                os.pwritev(fd, [buf], c * CHUNK + 65536)
            finally:
                os.close(fd)
                buf.close()
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert table_olds(direct, cow) == {7 * 16} | {c * 16 + 1 for c in chunks}
    report("cow-completeness", {"direct_after_write": True, "buffered_stale": stale == set()})
    assert bt.dirty(lv).dirty == {7, *chunks}


def test_overflowing_snapshot_means_everything_dirty(bt):
    lv = lvcreate("raw", 128)
    bt.json("enroll", lv, "--backend", "snapshot", "--cow-size", "8M")
    write_chunks(lv, range(0, 32), size=CHUNK)                       # 32 MiB through an 8 MiB COW volume
    status = bt.json("status", lv)["devices"][0]
    assert status["snapshot"]["invalid"] is True and status["dirty"] == status["chunks"]
    result = bt.json("dirty", lv)
    assert result["dirty"] == [[0, 127]] and result["count"] == 128
    assert result["warnings"] and "overflow" in result["warnings"][0]
    # The next snapshot is a fresh one: exact again.
    write_chunks(lv, [100])
    assert bt.dirty(lv).dirty == {100}
    report("snapshot-overflow", {"warning": result["warnings"][0]})


def test_interrupted_passes_lose_nothing(bt):
    lv = lvcreate("raw", 64)
    before = all_tables()
    bt.json("enroll", lv, "--backend", "snapshot")
    write_chunks(lv, [1])
    # Killed with both snapshots live: the stale new one is dropped, the old one still holds chunk 1.
    proc = bt.run("dirty", lv, check=False, fault="snapshot.dirty.after-switch=kill")
    assert proc.returncode == -9
    write_chunks(lv, [2])
    r1 = bt.dirty(lv)
    assert r1.dirty == {1, 2}
    # Killed after the old snapshot was removed, before the record moved on: finished from its COW volume.
    write_chunks(lv, [3])
    proc = bt.run("dirty", lv, check=False, fault="snapshot.dirty.after-remove=kill")
    assert proc.returncode == -9
    write_chunks(lv, [4])
    r2 = bt.dirty(lv)
    assert r2.dirty == {3, 4}
    assert bt.dirty(lv, since=r1.checkpoint).dirty == {3, 4}
    bt.run("unenroll", lv)
    assert all_tables() == before
