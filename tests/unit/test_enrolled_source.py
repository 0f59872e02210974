"""EnrolledSource's own logic (blocktrack/migrate/enrolled_source.py), over a stand-in tracker that keeps
its writes in memory: what the adapter adds between a kernel backend and the migration engine (pending
chunks, forget, checkpoint tokens, the refresher pausing while frozen). The kernel backends themselves
are proven in the lab (tests/kernel/test_backend_*.py, test_migrate_lv.py)."""

from __future__ import annotations

import threading
import time

from blocktrack.dirtymap import DirtyMap
from blocktrack.migrate import enrolled_source
from blocktrack.migrate.enrolled_source import EnrolledSource

MiB = 1 << 20
NCHUNKS = 16


class MemoryTracker:
    """The Backend calls EnrolledSource makes, with the checkpoint semantics of backends/base.py."""

    name = "era"

    def __init__(self):
        self.size, self.chunk_size = NCHUNKS * MiB, MiB
        self.record = {"id": "abc", "enrolled_at": "2026-11-27T00:00:00Z", "first_checkpoint": 1, "checkpoint": 1,
                       "hidden": {"origin": "blocktrack-abc-orig"}}
        self.writes: list[tuple[int, int]] = []           # (checkpoint when written, chunk)
        self.frozen = False
        self.calls = 0
        self.lock = threading.Lock()

    @property
    def checkpoint(self):
        return self.record["checkpoint"]

    def write(self, chunk: int) -> None:
        with self.lock:
            self.writes.append((self.record["checkpoint"], chunk))

    def dirty_since(self, since=None):
        with self.lock:
            self.calls += 1
            since = self.record["checkpoint"] if since is None else since
            dirty = DirtyMap(NCHUNKS, MiB)
            for cp, chunk in self.writes:
                if cp >= since:
                    dirty.mark(chunk)
            self.record["checkpoint"] += 1
            return dirty, self.record["checkpoint"]

    def require_tracking(self):
        return None

    def tracking_state(self):
        return ("frozen" if self.frozen else "tracking"), None

    def reload(self):
        pass

    def freeze(self):
        self.frozen = True

    def thaw(self):
        self.frozen = False


def make(monkeypatch, refresh=3600.0) -> tuple[EnrolledSource, MemoryTracker]:
    tracker = MemoryTracker()
    monkeypatch.setattr(enrolled_source, "REFRESH_S", refresh)
    return EnrolledSource.around(tracker, "era"), tracker


def test_a_new_migration_starts_a_checkpoint_and_owes_nothing(monkeypatch):
    source, tracker = make(monkeypatch)
    tracker.write(3)                                   # before the migration: the bulk pass copies it
    since, note = source.start(None)
    try:
        assert list(since) == [] and note is None
        assert source.path == "/dev/mapper/blocktrack-abc-orig"
        tracker.write(5)
        assert list(source.take_dirty()) == [5]
        assert list(source.take_dirty()) == []
    finally:
        source.close()


def test_pending_chunks_survive_until_taken_and_forget_clears_only_pending(monkeypatch):
    source, tracker = make(monkeypatch)
    source.start(None)
    try:
        tracker.write(1)
        tracker.write(2)
        with source._lock:
            source._pass_into_pending()                # what the refresher does
        assert source.dirty_count() == 2
        source.forget(1)                               # the bulk pass is about to read chunk 1
        tracker.write(1)                               # ... and a write lands after the forget
        assert sorted(source.take_dirty()) == [1, 2]   # reported again by the tracker: never lost
    finally:
        source.close()


def test_a_checkpoint_token_resumes_with_every_write_since(monkeypatch):
    source, tracker = make(monkeypatch)
    source.start(None)
    token = source.checkpoint()
    list(source.take_dirty())
    tracker.write(7)
    source.close()

    again = EnrolledSource.around(tracker, "era")
    since, note = again.start(token)
    again.close()
    assert 7 in set(since) and note is None


def test_a_token_from_another_enrollment_means_everything_dirty(monkeypatch):
    source, tracker = make(monkeypatch)
    source.start(None)
    token = source.checkpoint()
    source.close()
    tracker.record["enrolled_at"] = "2026-11-28T00:00:00Z"  # unenrolled and enrolled again meanwhile
    again = EnrolledSource.around(tracker, "era")
    since, note = again.start(token)
    again.close()
    assert len(list(since)) == NCHUNKS and "every chunk" in note


def test_the_refresher_takes_passes_but_not_while_frozen(monkeypatch):
    source, tracker = make(monkeypatch, refresh=0.02)
    source.start(None)
    try:
        tracker.write(4)
        deadline = time.monotonic() + 5
        while source.dirty_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert source.dirty_count() == 1
        source.freeze()
        calls = tracker.calls
        time.sleep(0.2)
        assert tracker.calls == calls, "the refresher ran a pass while the source was frozen"
        assert sorted(source.take_dirty()) == [4]
        source.thaw()
        assert not tracker.frozen
    finally:
        source.close()


def test_a_device_left_frozen_by_a_killed_migration_is_thawed_at_start(monkeypatch):
    source, tracker = make(monkeypatch)
    tracker.freeze()                                   # what a migrate SIGKILLed mid-cutover leaves
    since, note = source.start(None)
    source.close()
    assert not tracker.frozen and "left frozen" in note
