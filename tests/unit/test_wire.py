"""Property tests of blocktrack.wire: round trips, truncation at every byte, single-byte mutations.

Most tests use a 512-byte chunk so that whole streams stay small enough to cut and mutate at every
byte; one round trip runs at the real 1 MiB chunk size.
"""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocktrack.errors import StreamError, StreamTruncated
from blocktrack.wire import CHUNK_SIZE, SECTOR_SIZE, Record, StreamReader, StreamWriter

SMALL = 512
ENVELOPES = ("qemu", "none")
DEVICES = ("drive0", "drive1", "vdb-é", "x" * 255, "ü")


class Trickle(io.RawIOBase):
    """A raw stream that hands out at most a few bytes per readinto(), in a repeating pattern."""

    def __init__(self, data: bytes, steps=(1 << 30,)):
        self._data = memoryview(data)
        self._pos = 0
        self._steps = list(steps) or [1 << 30]
        self._i = 0

    def readable(self):
        return True

    def readinto(self, b):
        step = max(1, self._steps[self._i % len(self._steps)])
        self._i += 1
        n = min(len(b), step, len(self._data) - self._pos)
        b[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


def payload(seed: int, chunk: int) -> bytes:
    return random.Random(seed).randbytes(chunk)


# An operation on the writer: ("block", device, chunk index, zero, seed) | ("progress", p) | ("end",)
block_op = st.tuples(st.just("block"), st.sampled_from(DEVICES), st.integers(0, 1 << 20), st.booleans(),
                     st.integers(0, 1 << 30))
progress_op = st.tuples(st.just("progress"), st.integers(0, 100))
end_op = st.just(("end",))
ops_strategy = st.lists(st.one_of(block_op, progress_op, end_op), max_size=25)
final_strategy = st.one_of(st.none(), st.lists(st.one_of(block_op, progress_op), max_size=5))


def write_stream(envelope: str, ops, final_ops, chunk: int = SMALL) -> tuple[bytes, list[tuple]]:
    """Run ops through a StreamWriter; return the bytes and the records a reader must return."""
    out = io.BytesIO()
    w = StreamWriter(out, envelope=envelope, chunk_size=chunk)
    spc = chunk // SECTOR_SIZE
    expected: list[tuple] = []
    is_open = False
    in_final = False

    def apply(op):
        nonlocal is_open
        if op[0] == "block":
            _, dev, idx, zero, seed = op
            if zero:
                w.block(dev, idx * spc, zero=True)
                expected.append(("block", dev, idx * spc, True, None))
            else:
                data = payload(seed, chunk)
                w.block(dev, idx * spc, data)
                expected.append(("block", dev, idx * spc, False, data))
            is_open = True
        elif op[0] == "progress":
            w.progress(op[1])
            # Only the final part may say 100 (the end of a bare stream): the writer reports 99 before it.
            expected.append(("progress", op[1] if in_final else min(op[1], 99)))
            is_open = True
        else:
            w.end_part()
            expected.append(("eos",))
            is_open = False

    w.start()
    expected.append(("eos",))
    for op in ops:
        apply(op)
    if final_ops is not None:
        w.begin_final()
        in_final = True
        if is_open:
            expected.append(("eos",))
            is_open = False
        for op in final_ops:
            apply(op)
    elif is_open:
        expected.append(("eos",))
    w.finish()
    expected += [("progress", 100), ("eos",)]
    data = out.getvalue()
    assert w.bytes_written == len(data)
    return data, expected


def as_tuple(rec: Record, data: bytes | None) -> tuple:
    if rec.kind == "block":
        return ("block", rec.device, rec.sector, rec.zero, data)
    if rec.kind == "progress":
        return ("progress", rec.percent)
    return ("eos",)


def decode(data: bytes, chunk: int = SMALL, steps=(1 << 30,), out: list | None = None, **kw) -> list[tuple]:
    """All records of a stream (appended to ``out`` as they come, so a caller sees the prefix on error)."""
    reader = StreamReader(Trickle(data, steps), chunk_size=chunk, **kw)
    records = [] if out is None else out
    buf = bytearray(chunk)
    while True:
        rec = reader.next_record()
        if rec is None:
            break
        got = None
        if rec.kind == "block" and not rec.zero:
            reader.read_payload(buf)
            got = bytes(buf)
        records.append(as_tuple(rec, got))
    assert reader.next_record() is None  # stays at the end
    assert reader.offset == len(data)
    return records


def check_structure(rec: tuple, chunk: int) -> None:
    """What any record a reader returns must look like, whatever the input bytes."""
    assert rec[0] in ("block", "progress", "eos")
    if rec[0] == "block":
        _, dev, sector, zero, data = rec
        raw = dev.encode("utf-8")
        assert 1 <= len(raw) <= 255 and b"\0" not in raw
        assert sector >= 0 and sector % (chunk // SECTOR_SIZE) == 0
        assert (data is None) == zero and (data is None or len(data) == chunk)
    elif rec[0] == "progress":
        assert 0 <= rec[1] <= 100


def eos_boundaries(data: bytes, chunk: int) -> set[int]:
    """Stream offsets right after each final part ("progress 100, EOS") of a "none" stream: its clean ends."""
    reader = StreamReader(io.BytesIO(data), chunk_size=chunk)
    ends = set()
    previous = None
    for rec in reader:
        if rec.kind == "eos" and previous is not None and previous.kind == "progress" and previous.percent == 100:
            ends.add(rec.offset + 8)
        previous = rec
    return ends


# ---- round trips ---------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, final_ops=final_strategy, steps=st.lists(st.integers(1, 700), max_size=6))
def test_round_trip_both_envelopes(ops, final_ops, steps):
    results = {}
    for envelope in ENVELOPES:
        data, expected = write_stream(envelope, ops, final_ops)
        assert data.startswith(b"QEVM") == (envelope == "qemu")
        reader_records = decode(data, steps=steps)
        assert reader_records == expected
        results[envelope] = data
    # The bare envelope is exactly the concatenation of the qemu envelope's block-section bodies.
    assert block_section_bodies(results["qemu"]) == results["none"]


def block_section_bodies(data: bytes) -> bytes:
    reader = StreamReader(io.BytesIO(data), chunk_size=SMALL, trace_sections=True)
    for _ in reader:
        pass
    sections = reader.sections
    bodies = []
    for here, after in zip(sections, sections[1:]):
        if here.name == "block" and here.kind in ("START", "PART", "END"):
            head = 1 + 4 + (1 + len("block") + 4 + 4 if here.kind == "START" else 0)
            bodies.append(data[here.offset + head:after.offset - 5])  # up to the 5-byte footer
    return b"".join(bodies)


@pytest.mark.parametrize("envelope", ENVELOPES)
def test_round_trip_real_chunk_size(envelope):
    ops = [("block", "drive0", 0, False, 1), ("block", "drive1", 3, True, 0), ("progress", 50), ("end",),
           ("block", "drive0", 7, False, 2)]
    data, expected = write_stream(envelope, ops, [("block", "drive1", 1, False, 3)], chunk=CHUNK_SIZE)
    assert decode(data, chunk=CHUNK_SIZE, steps=(4096, 1 << 20, 13)) == expected


@pytest.mark.parametrize("envelope", ENVELOPES)
def test_iteration_skips_unread_payloads(envelope):
    data, expected = write_stream(envelope, [("block", "a", 1, False, 5), ("block", "b", 2, True, 0)], None)
    got = [as_tuple(r, None) for r in StreamReader(io.BytesIO(data), chunk_size=SMALL)]
    assert got == [e if e[0] != "block" or e[3] else e[:4] + (None,) for e in expected]


# ---- truncation ------------------------------------------------------------------------------------


small_ops = st.lists(st.one_of(block_op, progress_op, end_op), max_size=5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=small_ops, final_ops=st.one_of(st.none(), st.lists(block_op, max_size=2)))
def test_every_truncation_point(ops, final_ops):
    for envelope in ENVELOPES:
        data, expected = write_stream(envelope, ops, final_ops)
        clean_ends = eos_boundaries(data, SMALL) if envelope == "none" else set()
        for cut in range(len(data)):
            got: list = []
            if cut in clean_ends:
                # A cut right after a part that ended with "progress 100, EOS" looks like a whole stream.
                assert decode(data[:cut], out=got) == expected[:len(got)]
                continue
            with pytest.raises(StreamTruncated) as info:
                decode(data[:cut], out=got)
            assert got == expected[:len(got)], f"wrong record before the cut at {cut}"
            assert info.value.offset is not None and 0 <= info.value.offset <= cut


# ---- mutation --------------------------------------------------------------------------------------


def decode_or_error(data: bytes) -> list | None:
    """Decode fully; a StreamError is an acceptable outcome, any other exception fails the test."""
    got: list = []
    try:
        decode(data, out=got)
    except StreamError as exc:
        assert exc.offset is not None and 0 <= exc.offset <= len(data)
        for rec in got:
            check_structure(rec, SMALL)
        return None
    for rec in got:
        check_structure(rec, SMALL)
    return got


FIXED_OPS = [("block", "drive0", 0, False, 1), ("progress", 7), ("block", "drive1", 2, True, 0), ("end",),
             ("block", "drive0", 1, False, 2)]


@pytest.mark.parametrize("envelope", ENVELOPES)
def test_every_single_byte_mutation(envelope):
    data, _ = write_stream(envelope, FIXED_OPS, [("block", "vdb-é", 5, False, 3)])
    for pos in range(len(data)):
        for value in {data[pos] ^ 0xFF, data[pos] ^ 0x01, 0x00, 0x7E, 0x05, 0xFF} - {data[pos]}:
            mutated = bytearray(data)
            mutated[pos] = value
            decode_or_error(bytes(mutated))


@settings(max_examples=300, deadline=None)
@given(ops=small_ops, pos=st.integers(0), value=st.integers(0, 255), envelope=st.sampled_from(ENVELOPES),
       cut=st.one_of(st.none(), st.integers(0)))
def test_random_mutations(ops, pos, value, envelope, cut):
    data, _ = write_stream(envelope, ops, None)
    mutated = bytearray(data)
    mutated[pos % len(data)] = value
    if cut is not None:
        del mutated[cut % len(data):]
    decode_or_error(bytes(mutated))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_never_leak_other_exceptions(data):
    decode_or_error(data)
    decode_or_error(b"QEVM" + data)
    decode_or_error(b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x04none" + data)
