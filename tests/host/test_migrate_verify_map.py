""""VERIFIED" means the whole target equals the frozen source, whatever happened between attempts.

Default verification compares the digest map of both ends (every chunk as the sender sent it, and
as the receiver wrote it or, on a resume, read it back from the target): not only the final pass.

- a quiet source (nothing dirty at the cutover, an empty final pass) still verifies every chunk;
- a target chunk changed by a raw write between an interrupted attempt and its resume (the
  receiver's held.map still says "held") is caught: exit 6, never VERIFIED, and a further resume
  sends the chunk again and verifies;
- a plain `blocktrack receive` onto the target between attempts drops the migration's record: the
  resume is refused with a clear message, and `--restart` migrates it whole;
- a sender whose saved record misses a change of the source (a write it never saw, as if its map
  of owed chunks were damaged) is caught the same way: the sender's digests of the chunks it does
  not send again come from the source as it is at the resume, never from a saved file.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time

import pytest

from blocktrack.dirtymap import DirtyMap
from blocktrack.migrate.savedstate import SourceState, TargetState, source_folder, state_root, target_folder
from blocktrack.migrate.scenario import live_migration, release, sha256, start_migrate, start_receiver
from tests.conftest import MiB, blank_image, run_blocktrack, write_image
from tests.host.net_helpers import RecordDroppingProxy

LINK = 8 * MiB
SIZE = 32 * MiB


def test_quiet_source_verifies_every_chunk(tmp_path):
    size = 24 * MiB + 12288   # a short tail chunk too
    source = write_image(tmp_path / "src.img", size, seed=31, zero_ranges=[(2 * MiB, 2 * MiB)])
    target = write_image(tmp_path / "dst.img", size, seed=32)
    result = live_migration(source, target, tmp_path, writer_rate=0, rate_limit=None)
    summary, received = result.summary, result.receiver_summary
    assert result.migrate_code == 0 and summary is not None, result.migrate_stderr
    assert result.identical
    assert summary["final_chunks"] == 0            # nothing was dirty at the cutover ...
    assert summary["chunks_verified"] == 25        # ... and still every chunk was compared
    assert summary["verify"] == "digest"
    assert received["chunks_verified"] == 25 and received["verify"] == "digest-map"


def _interrupted_attempt(tmp_path, started):
    """A migration killed in its bulk pass; returns (source, target, state, sock, saved state)."""
    source = write_image(tmp_path / "src.img", SIZE, seed=33)
    target = blank_image(tmp_path / "dst.img", SIZE)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state)
    migrate = start_migrate(source, port, sock, state, "--rate-limit", LINK)
    started += [receiver, migrate]
    migrate.wait_event(lambda e: e.get("event") == "progress" and e.get("phase") == "bulk"
                       and e["sent_bytes"] >= 16 * MiB)
    migrate.stop(signal.SIGKILL)
    assert receiver.wait() in (3, 5), receiver.stderr
    saved = SourceState.load(source_folder(state_root(str(state)), str(source)))
    assert saved.phase == "bulk" and saved.bulk_cursor >= 4, saved
    held = DirtyMap.load(TargetState.held_path(target_folder(state_root(str(state)), str(target))))
    assert held.test(2), held.ranges()   # chunk 2 reached the target and the receiver recorded it
    return source, target, state, sock, saved


@pytest.fixture
def started():
    """Processes a test starts; any still running at the end (a failed test) is killed."""
    procs = []
    yield procs
    for proc in procs:
        if proc.alive():
            proc.stop(signal.SIGKILL)


def _resume(started, source, target, state, sock, *extra):
    receiver, port = start_receiver([f"src.img={target}"], state)
    migrate = start_migrate(source, port, sock, state, "--rate-limit", LINK, *extra)
    started += [receiver, migrate]
    return receiver, migrate


def _verified_or_failed(migrate, source, target) -> None:
    """Wait for the resumed attempt to end; it must not have cut over as verified."""
    end = migrate.follow(lambda e: e.get("event") in ("frozen", "error"))
    if end["event"] == "frozen":
        summary = migrate.named("summary")[-1]
        raise AssertionError(f"VERIFIED reported ({summary['chunks_verified']} chunks verified, verify "
                             f"{summary['verify']}), target equal to the frozen source: "
                             f"{sha256(source) == sha256(target)}")


def _assert_caught(receiver, migrate, chunk: int, source, target) -> None:
    """The resumed attempt failed verification on ``chunk``: exit 6 both ends, nothing verified."""
    _verified_or_failed(migrate, source, target)
    assert migrate.wait() == 6, migrate.stderr
    assert not migrate.named("summary") and not migrate.named("frozen"), migrate.events[-5:]
    assert f"chunks {chunk} differ" in migrate.stderr, migrate.stderr
    assert "VERIFIED" not in migrate.stderr
    assert receiver.wait() == 6, receiver.stderr
    assert not receiver.named("summary")


def _finish_verified(started, source, target, state, sock, *extra) -> dict:
    receiver, migrate = _resume(started, source, target, state, sock, *extra)
    frozen = migrate.follow(lambda e: e.get("event") in ("frozen", "error"))
    assert frozen["event"] == "frozen", migrate.stderr
    summary = migrate.named("summary")[-1]
    assert sha256(source) == sha256(target)
    released = release(source, state, retire=True)
    assert released.returncode == 0, released.stderr
    assert migrate.wait() == 0, migrate.stderr
    assert receiver.wait() == 0, receiver.stderr
    assert summary["chunks_verified"] == SIZE // MiB
    return summary


def test_raw_write_to_the_target_between_attempts_is_caught(tmp_path, started):
    source, target, state, sock, _saved = _interrupted_attempt(tmp_path, started)
    # Behind the receiver's back: chunk 2 is "held" in its record, and no longer what was sent.
    with open(target, "r+b") as f:
        os.pwrite(f.fileno(), b"\xee" * 4096, 2 * MiB + 8192)
    receiver, migrate = _resume(started, source, target, state, sock, "--resume")
    _assert_caught(receiver, migrate, 2, source, target)
    assert migrate.named("connected")[-1]["held_chunks"] >= 3
    assert receiver.named("held_read_back")[-1]["chunks"] >= 3   # its digests came from the target
    assert SourceState.load(source_folder(state_root(str(state)), str(source))).phase == "failed"
    # The mismatch left chunk 2 owed: the next resume sends it again and verifies.
    summary = _finish_verified(started, source, target, state, sock, "--resume")
    assert summary["attempt"] == 3


def test_plain_receive_between_attempts_drops_the_record(tmp_path, started):
    source, target, state, sock, saved = _interrupted_attempt(tmp_path, started)
    other = write_image(tmp_path / "other.img", SIZE, seed=34)
    stream = tmp_path / "other.stream"
    sent = run_blocktrack("send", "--device", f"src.img={other}", "--output", stream)
    assert sent.returncode == 0, sent.stderr
    received = run_blocktrack("receive", "--device", f"src.img={target}", "--input", stream, "--state-dir", state)
    assert received.returncode == 0, received.stderr

    receiver, migrate = _resume(started, source, target, state, sock, "--resume")
    _verified_or_failed(migrate, source, target)
    assert migrate.wait() == 5, migrate.stderr
    assert not migrate.named("summary")
    assert "was written outside it" in migrate.stderr and "--restart" in migrate.stderr, migrate.stderr
    assert saved.migration_id in migrate.stderr
    assert receiver.wait() != 0 and not receiver.named("summary")
    folder = target_folder(state_root(str(state)), str(target))
    record = TargetState.load(folder)
    assert record.status == "overwritten" and "plain `blocktrack receive`" in record.overwritten
    assert not TargetState.held_path(folder).exists()
    # Starting over migrates the device whole.
    summary = _finish_verified(started, source, target, state, sock, "--restart")
    assert summary["migration_id"] != saved.migration_id and summary["chunks_sent"] == SIZE // MiB


def test_source_change_the_saved_record_misses_is_caught(tmp_path, started):
    source, target, state, sock, _saved = _interrupted_attempt(tmp_path, started)
    # A change of a chunk the sender's record says is on the target and owes nothing for: what a
    # damaged map of owed chunks (or a write that bypassed the tracker) would leave.
    with open(source, "r+b") as f:
        os.pwrite(f.fileno(), b"\x5a" * 4096, 2 * MiB)
    receiver, migrate = _resume(started, source, target, state, sock, "--resume")
    _assert_caught(receiver, migrate, 2, source, target)
    summary = _finish_verified(started, source, target, state, sock, "--resume")
    assert summary["attempt"] == 3


def test_writable_serve_drops_the_record_read_only_does_not(tmp_path):
    """`blocktrack serve` lets clients write its export: like a plain receive, it drops a migration's
    record of that path before serving (read-only, it leaves the record alone)."""
    from blocktrack.migrate.savedstate import make_folder
    from blocktrack.migrate.scenario import JsonProcess, blocktrack_argv, tool_env
    from blocktrack.dirtymap import DirtyMap as Map

    target = blank_image(tmp_path / "dst.img", 4 * MiB)
    state = tmp_path / "state"
    folder = make_folder(target_folder(state_root(str(state)), str(target)))
    TargetState("ab" * 16, "disk", str(target), 4 * MiB, MiB, status="interrupted").save(folder)
    Map(4, MiB).save(TargetState.held_path(folder))
    for read_only in (True, False):
        argv = blocktrack_argv("serve", target, "--socket", tmp_path / "nbd.sock", "--json",
                               *(["--read-only"] if read_only else []))
        server = JsonProcess(argv, tool_env(state), name="serve")
        server.wait_event("serving")   # the record is dealt with before the export is served
        server.stop(signal.SIGKILL)
        record = TargetState.load(folder)
        if read_only:
            assert record.status == "interrupted" and TargetState.held_path(folder).exists()
        else:
            assert record.status == "overwritten" and "`blocktrack serve`" in record.overwritten
            assert not TargetState.held_path(folder).exists()


def test_verify_full_catches_a_target_changed_before_the_cutover(tmp_path, started, monkeypatch):
    """`--verify full` re-reads both devices at the cutover, so it also catches a target changed
    behind the receiver's back, which the digest maps cannot see: one byte of chunk 5, changed with
    dd after the receiver wrote that chunk and before the cutover, fails verification naming the
    device and chunk 5; never VERIFIED. (The sender pauses at the fault point before its cutover.)"""
    source = write_image(tmp_path / "src.img", SIZE, seed=36)
    target = blank_image(tmp_path / "dst.img", SIZE)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state)
    monkeypatch.setenv("BLOCKTRACK_FAULT", "migrate.before-cutover=pause")
    monkeypatch.setenv("BLOCKTRACK_FAULT_DIR", str(tmp_path))
    migrate = start_migrate(source, port, sock, state, "--verify", "full")
    monkeypatch.delenv("BLOCKTRACK_FAULT")
    started += [receiver, migrate]
    paused = tmp_path / "migrate.before-cutover.paused"
    wait_until(paused.exists, "the sender to pause before its cutover")
    chunk5 = source.read_bytes()[5 * MiB:6 * MiB]
    # No writer runs, so the receiver writes chunk 5 once: wait until it is there, then change it.
    wait_until(lambda: _read(target, 5 * MiB, MiB) == chunk5, "chunk 5 to reach the target")
    at = 5 * MiB + 777
    changed = bytes([chunk5[777] ^ 0xFF])
    subprocess.run(["dd", f"of={target}", "bs=1", f"seek={at}", "count=1", "conv=notrunc", "status=none"],
                   input=changed, check=True)
    (tmp_path / "migrate.before-cutover.resume").touch()
    _verified_or_failed(migrate, source, target)
    assert migrate.wait() == 6, migrate.stderr
    assert "chunks 5 differ" in migrate.stderr and "'src.img'" in migrate.stderr, migrate.stderr
    assert "VERIFIED" not in migrate.stderr
    assert receiver.wait() == 6, receiver.stderr


def _read(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def wait_until(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_chunk_record_dropped_on_the_way_never_verifies(tmp_path, started):
    """Over --insecure TCP (no integrity but TCP's), a proxy drops the whole record of chunk 7 from
    the stream. The migration fails at once by the stream's own check (the sender's MARK frame
    says how many bytes it sent; fewer arrived), or else by the digest maps naming chunk 7, and
    never reports VERIFIED. Before MARK frames it failed only by --stall-timeout, saying the
    network stalled."""
    source = write_image(tmp_path / "src.img", SIZE, seed=37)
    target = blank_image(tmp_path / "dst.img", SIZE)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state)
    record = struct.pack(">Q", 7 * MiB | 0x01) + bytes([len(b"src.img")]) + b"src.img"  # DEVICE_BLOCK
    proxy = RecordDroppingProxy(port, record, len(record) + MiB)
    try:
        migrate = start_migrate(source, proxy.address, sock, state, "--stall-timeout", "10")
        started += [receiver, migrate]
        _verified_or_failed(migrate, source, target)
        code = migrate.wait()
        assert proxy.dropped.is_set()
    finally:
        proxy.close()
    assert code != 0, migrate.stderr
    assert not migrate.named("summary") and "VERIFIED" not in migrate.stderr, migrate.stderr
    assert "chunks 7 differ" in migrate.stderr or "the stream was altered on the way" in migrate.stderr, migrate.stderr
    assert receiver.wait() != 0, receiver.stderr
    assert _read(target, 7 * MiB, MiB) != source.read_bytes()[7 * MiB:8 * MiB]
