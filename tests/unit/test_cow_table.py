"""dm-snapshot's persistent exception store, fed synthetic COW images: header, areas, the end marker,
full areas going on in the next, a full store, damage; and the conversion to 1 MiB dirty chunks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrack.dirtymap import DirtyMap
from blocktrack.errors import MetadataError
from blocktrack.kernel.snapshot_cow import (SNAP_MAGIC, CowHeader, area_location, mark_exceptions, parse_exceptions,
                                            parse_header)

MiB = 1 << 20


class Cow:
    """A sparse COW image as the kernel writes it: exceptions allocated in order, skipping metadata areas.
    Only the header and the metadata areas are stored; data chunks read as zeroes."""

    def __init__(self, old_chunks: list[int], chunk_sectors: int, cow_chunks: int, valid: int = 1):
        self.cb = chunk_sectors * 512
        self.cow_chunks = cow_chunks
        per_area = self.cb // 16
        self.chunks: dict[int, bytearray] = {0: bytearray(self.cb)}
        struct.pack_into("<IIII", self.chunks[0], 0, SNAP_MAGIC, valid, 1, chunk_sectors)
        next_free = 2
        for i, old in enumerate(old_chunks):
            area, index = divmod(i, per_area)
            new = next_free
            next_free += 1
            if (next_free - 1) % (per_area + 1) == 0:
                next_free += 1
            self.put(area_location(area, per_area), index * 16, struct.pack("<QQ", old, new))

    def put(self, chunk: int, offset: int, data: bytes) -> None:
        buf = self.chunks.setdefault(chunk, bytearray(self.cb))
        buf[offset:offset + len(data)] = data

    def read(self, chunk: int) -> bytes:
        return bytes(self.chunks.get(chunk, bytes(self.cb)))

    def table(self, origin_chunks=None):
        header = parse_header(self.read(0)[:16])
        return parse_exceptions(header, self.read, self.cow_chunks, origin_chunks=origin_chunks)


def build_cow(old_chunks, chunk_sectors, cow_chunks, valid=1) -> Cow:
    return Cow(old_chunks, chunk_sectors, cow_chunks, valid)


def table_of(cow: Cow, origin_chunks=None):
    return cow.table(origin_chunks)


def test_header_fields():
    h = parse_header(struct.pack("<IIII", SNAP_MAGIC, 1, 1, 128))
    assert h == CowHeader(SNAP_MAGIC, 1, 1, 128) and h.chunk_bytes == 64 * 1024
    assert parse_header(bytes(16)) is None                      # never used: the kernel formats it


@pytest.mark.parametrize("raw, match", [
    (struct.pack("<IIII", 0x12345678, 1, 1, 8), "magic"),
    (struct.pack("<IIII", SNAP_MAGIC, 1, 2, 8), "version"),
    (struct.pack("<IIII", SNAP_MAGIC, 1, 1, 12), "power of two"),
    (struct.pack("<IIII", SNAP_MAGIC, 1, 1, 4), "power of two"),
    (b"SnA", "truncated"),
])
def test_bad_headers(raw, match):
    with pytest.raises(MetadataError, match=match):
        parse_header(raw)


def test_invalid_snapshot_header_is_reported():
    assert parse_header(build_cow([1], 8, 16, valid=0).read(0)).valid == 0


def test_one_partial_area():
    t = table_of(build_cow([3, 100, 1000, 1001], 128, 64))
    assert t.old_chunks() == [3, 100, 1000, 1001] and t.areas_read == 1
    assert [new for _, new in t.exceptions] == [2, 3, 4, 5]


def test_full_area_goes_on_in_the_next():
    """4 KiB chunks: 256 exceptions per area; 301 fill the first area and go on in the second, whose
    location (chunk 258) the allocator skipped."""
    olds = [20] + list(range(5000, 5300))
    t = table_of(build_cow(olds, 8, 1024))
    assert t.old_chunks() == olds and t.areas_read == 2
    news = [new for _, new in t.exceptions]
    assert 258 not in news and news[255] == 257 and news[256] == 259


def test_store_full_up_to_the_end_of_the_device():
    """Every area full and no room for another: the table ends at the device end (no end marker)."""
    per_area = 256
    cow_chunks = 1 + 2 * (per_area + 1)             # exactly two areas with their data
    olds = list(range(2 * per_area))
    t = table_of(build_cow(olds, 8, cow_chunks))
    assert t.old_chunks() == olds and t.areas_read == 2


def test_exception_pointing_at_a_metadata_area_is_refused():
    cow = build_cow([7], 8, 600)
    cow.put(1, 0, struct.pack("<QQ", 7, 258))             # chunk 258 is area 1
    with pytest.raises(MetadataError, match="metadata area"):
        cow.table()


def test_exception_past_the_device_end_is_refused():
    cow = build_cow([7], 8, 16)
    cow.put(1, 0, struct.pack("<QQ", 7, 16))
    with pytest.raises(MetadataError, match="past the end"):
        cow.table()


def test_exception_past_the_origin_is_refused():
    with pytest.raises(MetadataError, match="origin"):
        table_of(build_cow([5000], 8, 16), origin_chunks=4096)


@pytest.mark.parametrize("chunk_kib, olds, expected", [
    (4, [0, 1, 255, 256], {0, 1}),                  # 256 4 KiB chunks per MiB
    (64, [15, 16, 17], {0, 1}),
    (1024, [3, 9], {3, 9}),
    (64, [16 * 100 + 5], {100}),
])
def test_marking_1mib_chunks(chunk_kib, olds, expected):
    t = table_of(build_cow(olds, chunk_kib * 2, 64))
    dirty = DirtyMap.for_size(128 * MiB)
    mark_exceptions(dirty, t)
    assert set(dirty) == expected


def test_marking_stops_at_the_device_end():
    """A device whose size is not a multiple of the snapshot chunk: its last COW chunk runs past it."""
    t = table_of(build_cow([0, 1], 2048, 8))                 # 1 MiB COW chunks
    dirty = DirtyMap.for_size(MiB + 4096)                       # two map chunks, the second 4 KiB
    mark_exceptions(dirty, t)
    assert set(dirty) == {0, 1}


@settings(max_examples=60, deadline=None)
@given(chunk_kib=st.sampled_from([4, 8, 64, 256]),
       olds=st.lists(st.integers(0, 16 * 1024 - 1), unique=True, max_size=700))
def test_roundtrip_any_table(chunk_kib, olds):
    chunk_sectors = chunk_kib * 2
    per_area = chunk_sectors * 512 // 16
    areas = len(olds) // per_area + 1
    cow_chunks = 1 + areas * (per_area + 1)
    origin_chunks = 64 * MiB // (chunk_kib * 1024)
    olds = [o % origin_chunks for o in olds]
    olds = list(dict.fromkeys(olds))
    t = table_of(build_cow(olds, chunk_sectors, cow_chunks), origin_chunks=origin_chunks)
    assert t.old_chunks() == olds
    dirty = DirtyMap.for_size(64 * MiB)
    mark_exceptions(dirty, t)
    assert set(dirty) == {o * chunk_kib * 1024 // MiB for o in olds}
