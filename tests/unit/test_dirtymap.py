"""DirtyMap against a Python set: marking, queries, runs, snapshots under concurrent markers,
save/load round trips and refusal of damaged files."""

from __future__ import annotations

import os
import random
import struct
import sys
import threading
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from blocktrack.dirtymap import MAGIC, DirtyMap, DirtyMapFileError
from blocktrack.errors import BlocktrackError, IOFailure

NCHUNKS = st.one_of(st.sampled_from([0, 1, 63, 64, 65, 128, 129, 200]), st.integers(0, 300))
CHUNK_SIZES = st.sampled_from([512, 4096, 1 << 16, 1 << 20])


def runs_of(model: set[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in sorted(model):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


class DirtyMapMachine(RuleBasedStateMachine):
    @initialize(nchunks=NCHUNKS, chunk_size=CHUNK_SIZES)
    def make(self, nchunks, chunk_size):
        self.dm = DirtyMap(nchunks, chunk_size)
        self.model: set[int] = set()

    def _first_count(self, data):
        n = self.dm.nchunks
        first = data.draw(st.integers(0, n))
        return first, data.draw(st.integers(0, n - first))

    @rule(data=st.data())
    def mark(self, data):
        first, count = self._first_count(data)
        self.dm.mark(first, count)
        self.model |= set(range(first, first + count))

    @rule(data=st.data())
    def mark_one(self, data):
        if self.dm.nchunks:
            i = data.draw(st.integers(0, self.dm.nchunks - 1))
            self.dm.mark(i)
            self.model.add(i)

    @rule(data=st.data())
    def mark_bytes(self, data):
        cs, total = self.dm.chunk_size, self.dm.nchunks * self.dm.chunk_size
        offset = data.draw(st.integers(0, total))
        length = data.draw(st.integers(0, total - offset))
        self.dm.mark_bytes(offset, length)
        if length:
            self.model |= set(range(offset // cs, (offset + length - 1) // cs + 1))

    @rule(data=st.data())
    def clear(self, data):
        first, count = self._first_count(data)
        self.dm.clear(first, count)
        self.model -= set(range(first, first + count))

    @rule()
    def mark_all(self):
        self.dm.mark_all()
        self.model = set(range(self.dm.nchunks))

    @rule(data=st.data())
    def out_of_range(self, data):
        n = self.dm.nchunks
        first = data.draw(st.integers(0, n + 3))
        with pytest.raises(IndexError):
            self.dm.mark(first, n - first + 1)
        with pytest.raises(IndexError):
            self.dm.clear(first, n - first + 1)
        with pytest.raises(IndexError):
            self.dm.test(n)
        with pytest.raises(IndexError):
            self.dm.mark(-1)
        with pytest.raises(IndexError):
            self.dm.mark_bytes(n * self.dm.chunk_size, 1)

    @rule(data=st.data())
    def next_set(self, data):
        start = data.draw(st.integers(0, self.dm.nchunks + 2))
        assert self.dm.next_set(start) == min((i for i in self.model if i >= start), default=None)

    @rule(data=st.data())
    def test(self, data):
        if self.dm.nchunks:
            i = data.draw(st.integers(0, self.dm.nchunks - 1))
            assert self.dm.test(i) == (i in self.model)

    @rule()
    def snapshot(self):
        snap = self.dm.snapshot_and_clear()
        assert (snap.nchunks, snap.chunk_size) == (self.dm.nchunks, self.dm.chunk_size)
        assert set(snap) == self.model
        assert self.dm.count() == 0
        self.model = set()
        for first, last in snap.ranges():  # put them back
            self.dm.mark(first, last - first + 1)
            self.model |= set(range(first, last + 1))

    @invariant()
    def matches_model(self):
        if not hasattr(self, "dm"):
            return
        assert len(self.dm) == self.dm.nchunks
        assert self.dm.count() == len(self.model)
        assert list(self.dm) == sorted(self.model)
        assert self.dm.ranges() == runs_of(self.model)


DirtyMapMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=25, deadline=None)
TestDirtyMapAgainstSet = DirtyMapMachine.TestCase


@given(size=st.integers(0, 10 * (1 << 20)), chunk_size=CHUNK_SIZES)
def test_for_size_covers_the_tail(size, chunk_size):
    dm = DirtyMap.for_size(size, chunk_size)
    assert dm.nchunks == -(-size // chunk_size)
    if size:
        dm.mark_bytes(size - 1, 1)
        assert list(dm) == [dm.nchunks - 1]


def test_iteration_crosses_batches():
    dm = DirtyMap(20000)
    dm.mark_all()
    assert list(dm) == list(range(20000))
    dm.clear(5, 19990)
    assert list(dm) == [0, 1, 2, 3, 4, 19995, 19996, 19997, 19998, 19999]
    assert dm.ranges() == [[0, 4], [19995, 19999]]


def test_constructor_rejects_nonsense():
    with pytest.raises(ValueError):
        DirtyMap(-1)
    with pytest.raises(ValueError):
        DirtyMap(10, 0)


# -- snapshot_and_clear with concurrent markers ---------------------------------------------------


def test_snapshot_and_clear_loses_nothing_under_concurrent_markers():
    """Threads mark chunks (each chunk exactly once, neighbours in the same word from different
    threads) while the main thread keeps taking snapshots: every chunk must appear in exactly one
    snapshot or in what remains at the end. Markers pause half-way until a snapshot has been taken,
    so the test cannot pass without interleaving; before and after that they run free."""
    nchunks, nthreads = 50_000, 4
    dm = DirtyMap(nchunks)
    plans = [list(range(k, nchunks, nthreads)) for k in range(nthreads)]
    for k, plan in enumerate(plans):
        random.Random(k).shuffle(plan)
    barrier = threading.Barrier(nthreads + 1)
    halfway = threading.Semaphore(0)
    resume = threading.Event()
    errors: list[BaseException] = []

    def marker(plan):
        try:
            barrier.wait()
            for n, i in enumerate(plan):
                if n == len(plan) // 2:
                    halfway.release()
                    resume.wait()
                dm.mark(i)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=marker, args=(p,)) for p in plans]
    snapshots = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for t in threads:
            t.start()
        barrier.wait()
        while not halfway.acquire(blocking=False):
            snapshots.append(dm.snapshot_and_clear())
        for _ in range(nthreads - 1):
            halfway.acquire()
        snapshots.append(dm.snapshot_and_clear())
        assert sum(s.count() for s in snapshots) == sum(len(p) // 2 for p in plans)
        resume.set()
        while any(t.is_alive() for t in threads):
            snapshots.append(dm.snapshot_and_clear())
        for t in threads:
            t.join()
    finally:
        resume.set()
        sys.setswitchinterval(old)
    assert not errors
    snapshots.append(dm.snapshot_and_clear())
    assert sum(s.count() for s in snapshots) == nchunks, "a mark was lost or taken twice"
    union: set[int] = set()
    for s in snapshots:
        bits = set(s)
        assert not bits & union
        union |= bits
    assert union == set(range(nchunks))


def test_remark_after_snapshot_is_kept():
    """The sender's order: snapshot (clears), then read; a write racing the read marks again."""
    dm = DirtyMap(10)
    dm.mark(3)
    snap = dm.snapshot_and_clear()
    dm.mark(3)  # a write lands while chunk 3 is being read for sending
    assert list(snap) == [3] and list(dm) == [3]


# -- save / load ----------------------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60, deadline=None)
@given(nchunks=NCHUNKS, chunk_size=CHUNK_SIZES, data=st.data())
def test_save_load_round_trip(tmp_path, nchunks, chunk_size, data):
    dm = DirtyMap(nchunks, chunk_size)
    bits = set(data.draw(st.lists(st.integers(0, nchunks - 1), max_size=50))) if nchunks else set()
    for i in bits:
        dm.mark(i)
    path = tmp_path / "map.bt"
    dm.save(path)
    dm.save(path)  # replacing an existing file works too
    back = DirtyMap.load(path)
    assert (back.nchunks, back.chunk_size) == (nchunks, chunk_size)
    assert set(back) == bits
    assert os.listdir(tmp_path) == ["map.bt"], "temporary files left behind"
    assert path.stat().st_size == 32 + 8 * (-(-nchunks // 64)) + 4


def _saved(tmp_path, nchunks=130, marks=(0, 64, 129)) -> bytes:
    dm = DirtyMap(nchunks, 1 << 20)
    for i in marks:
        dm.mark(i)
    path = tmp_path / "good.bt"
    dm.save(path)
    return path.read_bytes()


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _load_bytes(tmp_path, data: bytes):
    path = tmp_path / "bad.bt"
    path.write_bytes(data)
    return DirtyMap.load(path)


def test_file_layout(tmp_path):
    data = _saved(tmp_path)
    magic, version, reserved, chunk_size, nchunks = struct.unpack_from("<8sIIQQ", data)
    assert (magic, version, reserved, chunk_size, nchunks) == (MAGIC, 1, 0, 1 << 20, 130)
    words = struct.unpack_from("<3Q", data, 32)
    assert words == (1, 1, 2)  # bit 0 -> word 0 bit 0, 64 -> word 1 bit 0, 129 -> word 2 bit 1
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == zlib.crc32(data[:-4])


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=80, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_is_detected(tmp_path, data):
    good = _saved(tmp_path)
    pos = data.draw(st.integers(0, len(good) - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(good)
    bad[pos] ^= 1 << bit
    with pytest.raises(DirtyMapFileError) as info:
        _load_bytes(tmp_path, bytes(bad))
    assert "bad.bt" in str(info.value)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=40, deadline=None)
@given(data=st.data())
def test_truncated_file_is_detected(tmp_path, data):
    good = _saved(tmp_path)
    cut = data.draw(st.integers(0, len(good) - 1))
    with pytest.raises(DirtyMapFileError, match="truncated"):
        _load_bytes(tmp_path, good[:cut])


def test_damage_is_explained(tmp_path):
    good = _saved(tmp_path)
    with pytest.raises(DirtyMapFileError, match="trailing"):
        _load_bytes(tmp_path, good + b"\0")
    with pytest.raises(DirtyMapFileError, match="not a dirty map"):
        _load_bytes(tmp_path, _with_crc(b"NOTDIRTY" + good[8:-4]))
    with pytest.raises(DirtyMapFileError, match="version 2"):
        _load_bytes(tmp_path, _with_crc(good[:8] + struct.pack("<I", 2) + good[12:-4]))
    with pytest.raises(DirtyMapFileError, match="checksum"):
        _load_bytes(tmp_path, good[:-4] + b"\0\0\0\0")
    # A consistent checksum does not excuse bits past the last chunk (130 chunks: bits 130..191 of
    # word 2 are padding).
    body = bytearray(good[:-4])
    body[32 + 16 + 7] |= 0x80
    with pytest.raises(DirtyMapFileError, match="past the last chunk"):
        _load_bytes(tmp_path, _with_crc(bytes(body)))
    # A header claiming an absurd size is refused by the length check, before any allocation.
    huge = good[:24] + struct.pack("<Q", 1 << 60) + good[32:-4]
    with pytest.raises(DirtyMapFileError, match="truncated"):
        _load_bytes(tmp_path, _with_crc(huge))
    assert issubclass(DirtyMapFileError, BlocktrackError)


def test_missing_file_is_an_io_failure(tmp_path):
    with pytest.raises(IOFailure) as info:
        DirtyMap.load(tmp_path / "nope.bt")
    assert info.value.path == str(tmp_path / "nope.bt")


def test_save_into_missing_directory_fails_clearly(tmp_path):
    with pytest.raises(IOFailure) as info:
        DirtyMap(4).save(tmp_path / "no" / "such" / "dir" / "map.bt")
    assert "no/such/dir" in str(info.value)
