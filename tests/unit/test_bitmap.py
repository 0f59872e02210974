"""The C bitmap (csrc/bt_bitmap.c) against a Python set, straight through the cffi binding.

DirtyMap's own behaviour is tested in test_dirtymap.py; here we pin down the C contract: return
codes (-ERANGE, -ENOENT, -EINVAL), word boundaries, bits past nbits staying zero, and that
snapshot_clear moves each concurrently set bit exactly once.
"""

from __future__ import annotations

import errno
import random
import subprocess
import sys
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from blocktrack._native import ffi, lib

# Sizes around word boundaries matter most: 0, 1, 63, 64, 65, ...
NBITS = st.one_of(st.sampled_from([0, 1, 2, 63, 64, 65, 127, 128, 129, 191, 192, 193, 320]),
                  st.integers(0, 400))


def new_bitmap(nbits: int):
    bm = ffi.new("struct bt_bitmap *")
    assert lib.bt_bitmap_init(bm, nbits) == 0
    return ffi.gc(bm, lib.bt_bitmap_free)


def words_of(bm) -> list[int]:
    out = ffi.new("uint64_t[]", max(bm.nwords, 1))
    assert lib.bt_bitmap_copy_out(bm, out, bm.nwords) == 0
    return list(out)[: bm.nwords]


def model_words(model: set[int], nwords: int) -> list[int]:
    words = [0] * nwords
    for i in model:
        words[i // 64] |= 1 << (i % 64)
    return words


class BitmapMachine(RuleBasedStateMachine):
    @initialize(nbits=NBITS)
    def make(self, nbits):
        self.nbits = nbits
        self.bm = new_bitmap(nbits)
        self.model: set[int] = set()

    def _index(self, data):
        # Indexes near word edges and the ends, plus anything in range.
        edges = sorted({i for w in range(0, self.nbits + 64, 64) for i in (w - 1, w, w + 1)
                        if 0 <= i < self.nbits} | {0, self.nbits - 1})
        return data.draw(st.one_of(st.sampled_from(edges), st.integers(0, self.nbits - 1)))

    @precondition(lambda self: self.nbits > 0)
    @rule(data=st.data())
    def set_range(self, data):
        first = self._index(data)
        count = data.draw(st.integers(0, self.nbits - first))
        assert lib.bt_bitmap_set_range(self.bm, first, count) == 0
        self.model |= set(range(first, first + count))

    @precondition(lambda self: self.nbits > 0)
    @rule(data=st.data())
    def clear_range(self, data):
        first = self._index(data)
        count = data.draw(st.integers(0, self.nbits - first))
        assert lib.bt_bitmap_clear_range(self.bm, first, count) == 0
        self.model -= set(range(first, first + count))

    @rule(data=st.data())
    def out_of_range_is_refused(self, data):
        first = data.draw(st.integers(0, self.nbits + 70))
        count = data.draw(st.integers(max(0, self.nbits - first + 1), self.nbits + 140))
        before = words_of(self.bm)
        assert lib.bt_bitmap_set_range(self.bm, first, count) == -errno.ERANGE
        assert lib.bt_bitmap_clear_range(self.bm, first, count) == -errno.ERANGE
        assert lib.bt_bitmap_set_range(self.bm, 2**64 - 1, 2) == -errno.ERANGE  # wraps: still refused
        assert words_of(self.bm) == before
        assert lib.bt_bitmap_test(self.bm, self.nbits) == -errno.ERANGE

    @precondition(lambda self: self.nbits > 0)
    @rule(data=st.data())
    def test_bit(self, data):
        i = self._index(data)
        assert lib.bt_bitmap_test(self.bm, i) == (i in self.model)

    @rule(data=st.data())
    def next_set_and_clear(self, data):
        start = data.draw(st.integers(0, self.nbits + 65))
        want_set = min((i for i in self.model if i >= start), default=None)
        want_clear = next((i for i in range(start, self.nbits) if i not in self.model), None)
        got_set = lib.bt_bitmap_next_set(self.bm, start)
        got_clear = lib.bt_bitmap_next_clear(self.bm, start)
        assert got_set == (-errno.ENOENT if want_set is None else want_set)
        assert got_clear == (-errno.ENOENT if want_clear is None else want_clear)

    @rule(data=st.data())
    def collect(self, data):
        start = data.draw(st.integers(0, self.nbits + 1))
        cap = data.draw(st.integers(0, 80))
        out = ffi.new("uint64_t[]", max(cap, 1))
        n = lib.bt_bitmap_collect(self.bm, start, out, cap)
        assert list(out)[:n] == sorted(i for i in self.model if i >= start)[:cap]

    @rule()
    def copy_round_trip(self):
        words = words_of(self.bm)
        other = new_bitmap(self.nbits)
        src = ffi.new("uint64_t[]", words or [0])
        assert lib.bt_bitmap_copy_in(other, src, self.bm.nwords) == 0
        assert words_of(other) == words
        assert lib.bt_bitmap_copy_in(other, src, self.bm.nwords + 1) == -errno.EINVAL

    @precondition(lambda self: self.nbits % 64 != 0)
    @rule(data=st.data())
    def copy_in_refuses_bits_past_the_end(self, data):
        words = words_of(self.bm)
        stray = data.draw(st.integers(self.nbits % 64, 63))
        words[-1] |= 1 << stray
        other = new_bitmap(self.nbits)
        assert lib.bt_bitmap_copy_in(other, ffi.new("uint64_t[]", words), len(words)) == -errno.EINVAL
        assert lib.bt_bitmap_count(other) == 0

    @rule(data=st.data())
    def snapshot_clear(self, data):
        dst = new_bitmap(self.nbits)
        already = set()
        if self.nbits:
            already = set(data.draw(st.lists(st.integers(0, self.nbits - 1), max_size=5)))
            for i in already:
                lib.bt_bitmap_set_range(dst, i, 1)
        moved = lib.bt_bitmap_snapshot_clear(self.bm, dst)
        assert moved == len(self.model)
        assert words_of(dst) == model_words(self.model | already, self.bm.nwords)
        moved_out, self.model = self.model, set()
        if data.draw(st.booleans()):  # move everything back, to keep the machine interesting
            assert lib.bt_bitmap_snapshot_clear(dst, self.bm) == len(moved_out | already)
            assert lib.bt_bitmap_count(dst) == 0
            self.model = moved_out | already

    @invariant()
    def matches_model(self):
        if not hasattr(self, "bm"):
            return
        assert lib.bt_bitmap_count(self.bm) == len(self.model)
        assert words_of(self.bm) == model_words(self.model, self.bm.nwords)


BitmapMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestBitmapAgainstSet = BitmapMachine.TestCase


@given(nbits=NBITS)
def test_init_sizes(nbits):
    bm = new_bitmap(nbits)
    assert bm.nbits == nbits
    assert bm.nwords == -(-nbits // 64)
    assert lib.bt_bitmap_count(bm) == 0
    assert lib.bt_bitmap_next_set(bm, 0) == -errno.ENOENT
    assert lib.bt_bitmap_next_clear(bm, 0) == (0 if nbits else -errno.ENOENT)
    assert lib.bt_bitmap_set_range(bm, 0, nbits) == 0
    assert lib.bt_bitmap_count(bm) == nbits
    assert lib.bt_bitmap_next_clear(bm, 0) == -errno.ENOENT  # padding bits are not clear bits


def test_snapshot_needs_equal_sizes():
    a, b = new_bitmap(64), new_bitmap(65)
    assert lib.bt_bitmap_snapshot_clear(a, b) == -errno.EINVAL


def test_free_twice_is_harmless():
    bm = ffi.new("struct bt_bitmap *")
    assert lib.bt_bitmap_init(bm, 100) == 0
    lib.bt_bitmap_free(bm)
    lib.bt_bitmap_free(bm)
    assert bm.words == ffi.NULL


def test_snapshot_clear_moves_each_bit_exactly_once_under_concurrent_markers():
    """Markers in several threads set interleaved bits (sharing every word) while the main thread
    snapshots in a loop; the C calls run with the GIL released, so they really race. Each bit is
    set once, so it must show up in exactly one snapshot or the final map: never lost, never twice.

    So that the test cannot pass without interleaving, markers pause half-way until the main thread
    has taken a snapshot; before and after that point everything runs free."""
    nbits = 64 * 400 + 13
    nthreads = 4
    bm = new_bitmap(nbits)
    plans = []
    for k in range(nthreads):
        mine = list(range(k, nbits, nthreads))
        random.Random(k).shuffle(mine)
        plans.append(mine)
    start = threading.Barrier(nthreads + 1)
    halfway = threading.Semaphore(0)
    resume = threading.Event()

    def marker(indices):
        start.wait()
        half = len(indices) // 2
        for n, i in enumerate(indices):
            if n == half:
                halfway.release()
                resume.wait()
            assert lib.bt_bitmap_set_range(bm, i, 1) == 0

    out = ffi.new("uint64_t[]", nbits)
    seen: list[int] = []

    def snapshot() -> list[int]:
        dst = new_bitmap(nbits)
        moved = lib.bt_bitmap_snapshot_clear(bm, dst)
        got = ffi.unpack(out, lib.bt_bitmap_collect(dst, 0, out, nbits))
        assert moved == len(got)
        seen.extend(got)
        return got

    threads = [threading.Thread(target=marker, args=(p,)) for p in plans]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the Python threads finely as well
    try:
        for t in threads:
            t.start()
        start.wait()
        while not halfway.acquire(blocking=False):
            snapshot()  # racing the first halves
        for _ in range(nthreads - 1):
            halfway.acquire()
        snapshot()  # every marker is parked mid-way: the first halves must be all accounted for
        assert len(seen) == sum(len(p) // 2 for p in plans)
        resume.set()
        while any(t.is_alive() for t in threads):
            snapshot()  # racing the second halves
        for t in threads:
            t.join()
        snapshot()
    finally:
        resume.set()
        sys.setswitchinterval(old_interval)
    assert lib.bt_bitmap_count(bm) == 0
    assert len(seen) == nbits, "a bit was lost or moved twice"
    assert sorted(seen) == list(range(nbits))


def test_snapshot_clear_stress_in_c(tmp_path):
    """csrc/test_bt_bitmap.c: pthread markers and snapshots in tight C loops, where the window
    between reading a word and clearing it is actually hit (a load-then-store snapshot fails it
    within a few rounds, where the Python-thread test above usually passes)."""
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    exe = tmp_path / "test_bt_bitmap"
    subprocess.run(["gcc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", f"-I{csrc}",
                    str(csrc / "test_bt_bitmap.c"), str(csrc / "bt_bitmap.c"), "-o", str(exe)], check=True)
    result = subprocess.run([str(exe), "300"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 300 rounds")
