"""blocktrack.wire: each malformation named in the reader's contract, the header codec, writer checks."""

from __future__ import annotations

import io
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrack.errors import StreamError, StreamTruncated
from blocktrack.wire import (
    CHUNK_SIZE,
    FLAG_DEVICE_BLOCK,
    FLAG_EOS,
    FLAG_PROGRESS,
    FLAG_ZERO_BLOCK,
    Record,
    StreamReader,
    StreamWriter,
    decode_block_header,
    encode_block_header,
    encode_progress,
)
from blocktrack.wire import layout as L
from blocktrack.wire.writer import GLOBALSTATE_BODY, VMDESC_JSON

SMALL = 512
EOS = struct.pack(">Q", FLAG_EOS)


def read_all(data: bytes, chunk: int = SMALL) -> list[Record]:
    reader = StreamReader(io.BytesIO(data), chunk_size=chunk)
    records = []
    buf = bytearray(chunk)
    while (rec := reader.next_record()) is not None:
        records.append(rec)
        if rec.kind == "block" and not rec.zero:
            reader.read_payload(buf)
    return records


def fails(data: bytes, match: str | None, cls=StreamError, chunk: int = SMALL) -> StreamError:
    with pytest.raises(cls, match=match or None) as info:
        read_all(data, chunk)
    return info.value


def qemu_stream(*parts: bytes) -> bytes:
    """A minimal valid QEMU envelope around the given block-section PART bodies."""
    out = io.BytesIO()
    w = StreamWriter(out, chunk_size=SMALL)
    w.start()
    w.finish()
    data = out.getvalue()
    head_end = data.index(b"\x03\x00\x00\x00\x01")  # the block END section
    middle = b"".join(L.section_header(L.QEMU_VM_SECTION_PART, 1) + p + L.section_footer(1) for p in parts)
    return data[:head_end] + middle + data[head_end:]


def block(sector: int, name: bytes = b"drive0", flags: int = FLAG_DEVICE_BLOCK, payload: bool = True) -> bytes:
    head = struct.pack(">Q", (sector << 9) | flags) + bytes([len(name)]) + name
    return head + (bytes(SMALL) if payload and not flags & FLAG_ZERO_BLOCK else b"")


# ---- records --------------------------------------------------------------------------------------


FINAL = struct.pack(">Q", (100 << 9) | FLAG_PROGRESS) + EOS  # the last part's end: progress 100, EOS


def test_minimal_streams():
    assert [r.kind for r in read_all(FINAL)] == ["progress", "eos"]
    recs = read_all(qemu_stream(block(1) + EOS))
    assert [(r.kind, r.device, r.sector) for r in recs] == [
        ("eos", None, 0), ("block", "drive0", 1, ), ("eos", None, 0), ("progress", None, 0), ("eos", None, 0)]
    assert recs[3].percent == 100


@pytest.mark.parametrize("flags, match", [
    (0x10, "unknown flag bits 0x10"),
    (0x100 | FLAG_EOS, "unknown flag bits 0x100"),
    (0, "without flags"),
    (FLAG_PROGRESS | FLAG_EOS, "both progress and end"),
    (FLAG_ZERO_BLOCK, "ZERO_BLOCK flag without DEVICE_BLOCK"),
    (FLAG_ZERO_BLOCK | FLAG_EOS, "ZERO_BLOCK flag without DEVICE_BLOCK"),
])
def test_bad_flags(flags, match):
    exc = fails(EOS + struct.pack(">Q", flags) + EOS, match)
    assert exc.offset == 8


@pytest.mark.parametrize("flags", [FLAG_DEVICE_BLOCK | FLAG_PROGRESS, FLAG_DEVICE_BLOCK | FLAG_EOS,
                                   FLAG_DEVICE_BLOCK | FLAG_ZERO_BLOCK | FLAG_PROGRESS])
def test_block_with_progress_or_eos(flags):
    assert fails(block(0, flags=flags) + EOS, "block record also flagged").offset == 0


def test_progress_and_eos_fields():
    assert fails(struct.pack(">Q", (101 << 9) | FLAG_PROGRESS) + EOS, "progress record of 101").offset == 0
    assert fails(EOS + struct.pack(">Q", (1 << 9) | FLAG_EOS), "non-zero sector field 1").offset == 8


def test_unaligned_and_huge_sectors():
    assert fails(block(3, payload=False) + EOS, "chunk boundary", chunk=1024).offset == 0
    fails(block(1, payload=False) + EOS, "chunk boundary", chunk=CHUNK_SIZE)
    fails(block((1 << 55) - 1) + EOS, "beyond any device")


@pytest.mark.parametrize("name, match", [(b"", "empty device name"), (b"\xff\xfe", "not UTF-8"),
                                         (b"a\0b", "NUL")])
def test_bad_names(name, match):
    exc = fails(EOS + block(1, name) + EOS, match)
    assert exc.offset == 8


def test_payload_must_be_read_before_the_next_record():
    reader = StreamReader(io.BytesIO(block(1) + EOS), chunk_size=SMALL)
    rec = reader.next_record()
    with pytest.raises(StreamError, match="payload") as info:
        reader.next_record()
    assert info.value.offset == 0 and info.value.device == "drive0"
    with pytest.raises(ValueError):
        reader.read_payload(bytearray(SMALL - 1))
    reader.skip_payload()
    assert reader.next_record().kind == "eos" and rec.sector == 1
    with pytest.raises(StreamError, match="no block record payload"):
        reader.skip_payload()


def test_truncated_payload_names_the_device():
    exc = fails(EOS + block(1, b"vdb")[:-1], "payload", StreamTruncated)
    assert exc.offset == 8 and exc.device == "vdb"


def test_errors_stick():
    reader = StreamReader(io.BytesIO(struct.pack(">Q", 0x10)), chunk_size=SMALL)
    for _ in range(2):
        with pytest.raises(StreamError, match="unknown flag"):
            reader.next_record()


@pytest.mark.parametrize("data", [b"", b"\x00\x00", EOS[:7], EOS + block(1)[:3], EOS + block(1)[:12]])
def test_bare_truncation(data):
    fails(data, "", StreamTruncated)


def test_bare_end_needs_eos():
    fails(EOS + struct.pack(">Q", (5 << 9) | FLAG_PROGRESS), "end-of-section", StreamTruncated)
    assert [r.kind for r in read_all(EOS + FINAL)] == ["eos", "progress", "eos"]
    # A bare stream that stops after a part other than the final one is cut, not whole.
    fails(EOS + EOS, "final part", StreamTruncated)


def records_until_error(data: bytes) -> tuple[list[Record], StreamError | None]:
    """The records a bare stream yields before it fails (payloads read), and the error."""
    reader = StreamReader(io.BytesIO(data), chunk_size=SMALL)
    records, buf = [], bytearray(SMALL)
    try:
        while (rec := reader.next_record()) is not None:
            records.append(rec)
            if rec.kind == "block" and not rec.zero:
                reader.read_payload(buf)
    except StreamError as exc:
        return records, exc
    return records, None


@pytest.mark.parametrize("after", [
    block(2) + FINAL,                       # a whole part after the final part
    block(2) + EOS,                         # ... ending like a dirty pass
    FINAL + block(2) + FINAL,               # after an empty repeat of the final part
    block(2, flags=FLAG_DEVICE_BLOCK | FLAG_ZERO_BLOCK) + FINAL,
    struct.pack(">Q", (7 << 9) | FLAG_PROGRESS) + FINAL,
    EOS,
    b"\x00",
], ids=["part", "part-eos", "after-repeat", "zero-block", "progress", "eos", "garbage"])
def test_bare_stream_nothing_after_the_final_part(after):
    """The final part ("progress 100, EOS") ends a bare stream: whatever follows is refused before
    it is yielded, so a receiver writes none of it (a stream with another appended, say)."""
    good = block(1) + FINAL
    repeat = after.startswith(FINAL)        # an empty repeat of the final part is fine; what follows is not
    records, error = records_until_error(good + after)
    assert isinstance(error, StreamError) and "after the final part" in str(error), error
    assert [r.kind for r in records] == ["block", "progress", "eos"] + ["progress", "eos"] * repeat
    assert error.offset == len(good) + len(FINAL) * repeat


def test_bare_stream_may_repeat_an_empty_final_part():
    """Older writers closed a part right after the last chunk with "progress 100, EOS", then sent the
    final part: an empty repeat, no data. Those streams stay readable."""
    assert [r.kind for r in read_all(block(1) + FINAL + FINAL)] == ["block", "progress", "eos", "progress", "eos"]


def test_bare_writer_ends_only_the_final_part_with_progress_100():
    out = io.BytesIO()
    w = StreamWriter(out, envelope="none", chunk_size=SMALL)
    w.start()
    w.block("drive0", 0, bytes(SMALL))
    w.progress(100)                         # the last chunk was sent, but this is not the final part
    w.end_part()
    w.finish()
    records = read_all(out.getvalue())
    assert [r.percent for r in records if r.kind == "progress"] == [99, 100]


# ---- the envelope ---------------------------------------------------------------------------------


def test_envelope_detection_and_metadata():
    reader = StreamReader(io.BytesIO(qemu_stream()), chunk_size=SMALL, trace_sections=True)
    list(reader)
    assert reader.envelope == "qemu" and reader.machine == "none"
    assert [s.kind for s in reader.sections] == [
        "CONFIGURATION", "START", "START", "END", "END", "FULL", "FULL", "EOF", "VMDESCRIPTION"]
    assert reader.vmdesc == json.loads(VMDESC_JSON)
    reader = StreamReader(io.BytesIO(FINAL), chunk_size=SMALL)
    list(reader)
    assert reader.envelope == "none"


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) >= 1
    return data.replace(old, new, 1)


def test_bad_version_and_config():
    good = qemu_stream()
    fails(replace_once(good, b"QEVM\0\0\0\x03", b"QEVM\0\0\0\x02"), "obsolete")
    fails(replace_once(good, b"QEVM\0\0\0\x03", b"QEVM\0\0\0\x04"), "unsupported migration stream version 4")
    fails(replace_once(good, b"\x07\0\0\0\x04none", b"\x01\0\0\0\x04none"), "configuration section missing")
    fails(replace_once(good, b"\x07\0\0\0\x04none", b"\x07\0\0\0\x00none"), "machine name length 0")
    fails(replace_once(good, b"\x07\0\0\0\x04none", b"\x07\0\0\0\x04n\xffne"), "not ASCII")


def test_config_subsections():
    good = qemu_stream()
    sub = (b"\x05" + bytes([len(L.CONFIG_SUBSECTION_TARGET_PAGE_BITS)]) + L.CONFIG_SUBSECTION_TARGET_PAGE_BITS.encode()
           + struct.pack(">II", 1, 12)
           + b"\x05" + bytes([len(L.CONFIG_SUBSECTION_CAPABILITIES)]) + L.CONFIG_SUBSECTION_CAPABILITIES.encode()
           + struct.pack(">II", 1, 1) + b"\x0fx-ignore-shared")
    assert len(read_all(replace_once(good, b"none", b"none" + sub))) == 3
    fails(replace_once(good, b"none", b"none\x05\x03abc\0\0\0\x01"), "unknown configuration subsection")


def test_section_errors():
    good = qemu_stream(EOS)
    part = L.section_header(L.QEMU_VM_SECTION_PART, 1)
    fails(replace_once(good, part, L.section_header(L.QEMU_VM_SECTION_PART, 9)), "unknown section id 9")
    fails(replace_once(good, part, b"\x09\0\0\0\x01"), "unknown section type 0x09")
    fails(replace_once(good, part, b"\x08\0\0\0\x01"), "unexpected COMMAND")
    fails(replace_once(good, part + EOS + b"\x7e\0\0\0\x01", part + EOS + b"\x7e\0\0\0\x02"),
          "footer for id 2 closes section id 1")
    fails(replace_once(good, part + EOS + b"\x7e", part + EOS + b"\x7f"), "missing section footer")
    # A START for a section id that is already in use, and a second START of block.
    start_ram = L.section_header(L.QEMU_VM_SECTION_START, 2, "ram", 0, 4)
    fails(replace_once(good, start_ram, L.section_header(L.QEMU_VM_SECTION_START, 1, "ram", 0, 4)),
          "section id 1 of 'ram' is already used")
    fails(replace_once(good, start_ram, L.section_header(L.QEMU_VM_SECTION_START, 2, "block", 0, 1)),
          "'block' started twice")
    fails(replace_once(good, start_ram, L.section_header(L.QEMU_VM_SECTION_START, 2, "ram", 0, 5)),
          "version 5, expected 4")
    fails(replace_once(good, start_ram, L.section_header(L.QEMU_VM_SECTION_START, 2, "ram", 1, 4)),
          "instance id 1")
    fails(replace_once(good, start_ram, L.section_header(L.QEMU_VM_SECTION_START, 2, "apic", 0, 4)),
          "unknown or unsupported START section 'apic'")
    timer = L.section_header(L.QEMU_VM_SECTION_FULL, 0, "timer", 0, 2)
    fails(replace_once(good, timer, L.section_header(L.QEMU_VM_SECTION_START, 0, "timer", 0, 2)),
          "unknown or unsupported START section 'timer'")


def test_part_after_end_and_missing_end():
    good = qemu_stream()
    end_block = L.section_header(L.QEMU_VM_SECTION_END, 1)
    i = good.index(end_block)
    j = good.index(b"\x7e\0\0\0\x01", i) + 5
    end_section = good[i:j]
    doubled = good[:j] + end_section + good[j:]
    fails(doubled, "not open")
    fails(good[:i] + good[j:], "before the END of section")


def test_ram_must_be_empty():
    good = qemu_stream()
    fails(replace_once(good, L.RAM_MEM_SIZE_NONE + L.RAM_EOS, struct.pack(">Q", (16 << 20) | 4) + L.RAM_EOS),
          "guest RAM")
    fails(replace_once(good, L.RAM_MEM_SIZE_NONE + L.RAM_EOS, L.RAM_MEM_SIZE_NONE + struct.pack(">Q", 0x1008)),
          "ram section carries data")


def test_no_block_section():
    good = qemu_stream()
    start = good.index(L.section_header(L.QEMU_VM_SECTION_START, 1, "block", 0, 1))
    end = good.index(b"\x7e\0\0\0\x01", start) + 5
    stripped = good[:start] + good[end:]
    i = stripped.index(L.section_header(L.QEMU_VM_SECTION_END, 1))
    stripped = stripped[:i] + stripped[stripped.index(b"\x7e\0\0\0\x01", i) + 5:]
    fails(stripped, "no block section")


def test_full_sections():
    good = qemu_stream()
    fails(replace_once(good, GLOBALSTATE_BODY, struct.pack(">I", 7) + GLOBALSTATE_BODY[4:]), "does not match")
    fails(replace_once(good, b"\0\0\0\x08running", b"\0\0\0\x08RUNNING"), "not a run state")
    timer = L.section_header(L.QEMU_VM_SECTION_FULL, 0, "timer", 0, 2) + bytes(24)
    fails(replace_once(good, timer + b"\x7e", timer + b"\x05"), "subsection")


def test_vmdesc_required_and_checked():
    good = qemu_stream()
    eof = good.rindex(b"\x00\x06")
    fails(good[:eof + 1], "", StreamTruncated)
    fails(good[:eof + 1] + b"\x04", "expected the JSON description")
    fails(good + b"\0", "data after the end")
    bad = VMDESC_JSON.replace(b'"globalstate", "instance_id"', b'"globalstatf", "instance_id"')
    fails(replace_once(good, VMDESC_JSON, bad), "lists devices")
    fails(replace_once(good, VMDESC_JSON, VMDESC_JSON[:-1] + b"]"), "does not parse")
    fails(replace_once(good, b"\x06" + struct.pack(">I", len(VMDESC_JSON)), b"\x06\x7f\xff\xff\xff"),
          "JSON description of")


def test_non_blocking_raw_is_refused():
    class NonBlocking(io.RawIOBase):
        def readinto(self, b):
            return None

    with pytest.raises(BlockingIOError):
        StreamReader(NonBlocking(), chunk_size=SMALL).next_record()


# ---- header codec ---------------------------------------------------------------------------------

names = st.text(min_size=1, max_size=60).filter(lambda s: "\0" not in s and len(s.encode()) <= 255)


@settings(max_examples=200)
@given(index=st.integers(0, (1 << 40)), zero=st.booleans(), name=names)
def test_header_codec_round_trip(index, zero, name):
    sector = index * (CHUNK_SIZE // 512)
    head = encode_block_header(sector, FLAG_DEVICE_BLOCK | (FLAG_ZERO_BLOCK if zero else 0), name)
    rec, used = decode_block_header(head + b"tail", 100)
    assert used == len(head)
    assert rec == Record("block", 100, device=name, sector=sector, zero=zero)
    for cut in range(len(head)):
        with pytest.raises(StreamTruncated):
            decode_block_header(head[:cut])


@settings(max_examples=300)
@given(data=st.binary(max_size=300))
def test_header_decoder_fuzz(data):
    try:
        rec, used = decode_block_header(data, chunk_size=SMALL)
    except StreamError:
        return
    assert 8 <= used <= len(data) and rec.kind in ("block", "progress", "eos")


def test_codec_helpers():
    assert decode_block_header(encode_progress(42))[0] == Record("progress", 0, percent=42)
    assert decode_block_header(encode_block_header(0, FLAG_EOS))[0] == Record("eos", 0)
    with pytest.raises(ValueError):
        encode_block_header(0, FLAG_DEVICE_BLOCK)
    with pytest.raises(ValueError):
        encode_block_header(0, FLAG_DEVICE_BLOCK, "x" * 256)
    with pytest.raises(ValueError):
        encode_block_header(1 << 55, FLAG_EOS)
    with pytest.raises(ValueError):
        encode_progress(101)
    # Fuzzers may build invalid flag combinations; the decoder refuses them.
    with pytest.raises(StreamError):
        decode_block_header(encode_block_header(0, FLAG_DEVICE_BLOCK | FLAG_EOS, "a"))


# ---- writer checks --------------------------------------------------------------------------------


def test_writer_refuses_misuse():
    size = 1024
    w = StreamWriter(io.BytesIO(), chunk_size=size)
    with pytest.raises(ValueError):
        w.block("d", 0, bytes(size))  # before start()
    w.start()
    with pytest.raises(ValueError):
        w.start()
    for bad in [dict(device="", sector=0, data=bytes(size)), dict(device="d", sector=1, data=bytes(size)),
                dict(device="d", sector=0, data=bytes(size - 1)), dict(device="d", sector=0),
                dict(device="d", sector=0, data=bytes(size), zero=True), dict(device="a\0", sector=0, zero=True),
                dict(device="d", sector=-1, zero=True), dict(device="x" * 256, sector=0, zero=True)]:
        with pytest.raises(ValueError):
            w.block(**bad)
    with pytest.raises(ValueError):
        w.progress(101)
    w.begin_final()
    with pytest.raises(ValueError):
        w.end_part()
    w.finish()
    with pytest.raises(ValueError):
        w.finish()
    with pytest.raises(ValueError):
        StreamWriter(io.BytesIO(), envelope="json")
    with pytest.raises(ValueError):
        StreamWriter(io.BytesIO(), chunk_size=1000)


def test_writer_sends_payload_as_a_separate_write():
    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, data):
            self.writes.append(bytes(data))
            return len(data)

    rec = Recorder()
    w = StreamWriter(rec)
    w.start()
    payload = bytes(range(256)) * (CHUNK_SIZE // 256)
    w.block("drive0", 2048, payload)
    assert rec.writes[-1] == payload and len(rec.writes[-2]) == 8 + 1 + 6


def test_writer_completes_short_writes():
    class Short(io.RawIOBase):
        def __init__(self):
            self.buf = bytearray()

        def writable(self):
            return True

        def write(self, b):
            n = min(len(b), 1000)
            self.buf += bytes(b[:n])
            return n

    raw = Short()
    w = StreamWriter(raw, envelope="none", chunk_size=4096)
    w.start()
    w.block("d", 8, bytes(4096))
    w.finish()
    assert [r.kind for r in read_all(bytes(raw.buf), 4096)] == ["eos", "block", "eos", "progress", "eos"]
