"""A reader of dm-snapshot's persistent exception store (the COW device): which origin chunks were copied.

Layout (drivers/md/dm-snap-persistent.c), all little-endian, in units of the snapshot's chunk size
(``chunk_sectors`` * 512 bytes):

* chunk 0, the header: ``le32 magic = 0x70416e53 ("SnAp"); le32 valid; le32 version = 1;
  le32 chunk_size`` (sectors). An all-zero header means "never used": the kernel formats a new store.
  ``valid = 0`` means the snapshot was invalidated (it overflowed, or an I/O error): its table no longer
  says what changed.
* metadata areas: area ``i`` is chunk ``1 + i * (E + 1)`` with ``E = chunk_bytes / 16`` exceptions per
  area; the ``E`` chunks after each area hold the copied data it describes.
* an area is ``E`` entries ``{le64 old_chunk; le64 new_chunk}``: origin chunk ``old_chunk`` was copied to
  COW chunk ``new_chunk``. The table ends at the first entry with ``new_chunk == 0`` (chunk 0 is the
  header, so no real exception points there); a full area goes on in the next one, which the kernel
  zeroes before it writes the full one.

When is the table on disk complete? The kernel acknowledges a write to the origin that needs a copy only
after the copy is done *and* the area holding its exception was written with FLUSH+FUA
(``persistent_commit_exception`` runs the completion callbacks after ``area_io``); exceptions committed
together are batched into one area write, but no write completes before its exception is on disk. Later
writes to an already-copied chunk need no exception. So once a write has returned, its chunk is in the
on-disk table -- read *past the page cache*: the kernel writes the COW device with bios, so a buffered
read can return a stale copy of an area read before (tests/kernel/test_backend_snapshot.py proves both).
Writes still in flight are not there yet; the snapshot backend suspends the origin (which waits for them)
whenever it switches to a new snapshot.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

from blocktrack.errors import MetadataError, check

SNAP_MAGIC = 0x70416E53
DISK_VERSION = 1
SECTOR = 512
_HEADER = struct.Struct("<IIII")
_EXCEPTION = struct.Struct("<QQ")


@dataclass(frozen=True)
class CowHeader:
    magic: int
    valid: int
    version: int
    chunk_sectors: int

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_sectors * SECTOR


@dataclass
class ExceptionTable:
    header: CowHeader
    exceptions: list[tuple[int, int]] = field(default_factory=list)      # (old_chunk, new_chunk)
    areas_read: int = 0

    @property
    def exceptions_per_area(self) -> int:
        return self.header.chunk_bytes // _EXCEPTION.size

    def old_chunks(self) -> list[int]:
        return [old for old, _new in self.exceptions]


def area_location(area: int, exceptions_per_area: int) -> int:
    """COW chunk holding metadata area ``area``."""
    return 1 + area * (exceptions_per_area + 1)


def parse_header(data: bytes, path: str = "<cow>") -> CowHeader | None:
    """The header in the first bytes of chunk 0, or None for an unused (all-zero magic) store."""
    if len(data) < _HEADER.size:
        raise MetadataError(path, "COW header truncated", 0)
    magic, valid, version, chunk_sectors = _HEADER.unpack_from(data)
    if magic == 0:
        return None
    if magic != SNAP_MAGIC:
        raise MetadataError(path, f"not a persistent snapshot store (magic {magic:#x}, expected {SNAP_MAGIC:#x})", 0)
    if version != DISK_VERSION:
        raise MetadataError(path, f"snapshot store version {version} (this reader knows {DISK_VERSION})", 0)
    if chunk_sectors == 0 or chunk_sectors & (chunk_sectors - 1) or chunk_sectors * SECTOR < 4096:
        raise MetadataError(path, f"snapshot chunk size {chunk_sectors} sectors is not a power of two >= 8", 0)
    return CowHeader(magic, valid, version, chunk_sectors)


def parse_exceptions(header: CowHeader, read_chunk, cow_chunks: int, path: str = "<cow>",
                     origin_chunks: int | None = None) -> ExceptionTable:
    """Walk the metadata areas. ``read_chunk(i)`` returns COW chunk ``i`` (``header.chunk_bytes`` long);
    ``cow_chunks`` is the COW device's size in chunks; ``origin_chunks`` bounds old_chunk when known."""
    table = ExceptionTable(header)
    per_area = table.exceptions_per_area
    area = 0
    while True:
        loc = area_location(area, per_area)
        if loc >= cow_chunks:
            # Every area so far was full and the next would lie past the end: the store is full.
            return table
        data = read_chunk(loc)
        if len(data) != header.chunk_bytes:
            raise MetadataError(path, f"short metadata area ({len(data)} bytes)", loc)
        table.areas_read += 1
        for i in range(per_area):
            old, new = _EXCEPTION.unpack_from(data, i * _EXCEPTION.size)
            if new == 0:
                return table
            if new >= cow_chunks or (new - 1) % (per_area + 1) == 0:
                raise MetadataError(path, f"exception {old}->{new} points at a metadata area or past the "
                                          f"end ({cow_chunks} chunks)", loc)
            if origin_chunks is not None and old >= origin_chunks:
                raise MetadataError(path, f"exception for origin chunk {old}, past the origin's "
                                          f"{origin_chunks} chunks", loc)
            table.exceptions.append((old, new))
        area += 1


class CowDevice:
    """A COW device opened for O_DIRECT reads of whole chunks."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            check(-(e.errno or 5), "open snapshot COW device", path)
            raise
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self._buf = None

    def read(self, offset: int, length: int) -> bytes:
        if self._buf is None or len(self._buf) < length:
            if self._buf is not None:
                self._buf.close()
            self._buf = mmap.mmap(-1, max(length, 4096))
        view = memoryview(self._buf)[:length]
        try:
            n = os.preadv(self.fd, [view], offset)
        except OSError as e:
            check(-(e.errno or 5), "read snapshot COW device", self.path, offset)
            raise
        finally:
            view.release()
        if n != length:
            raise MetadataError(self.path, f"short read at byte {offset} ({n} of {length} bytes)")
        return bytes(self._buf[:length])

    def header(self) -> CowHeader | None:
        return parse_header(self.read(0, 4096), self.path)

    def exception_table(self, origin_chunks: int | None = None) -> ExceptionTable:
        header = self.header()
        if header is None:
            raise MetadataError(self.path, "the COW device holds no snapshot store (zero header)", 0)
        return parse_exceptions(header, lambda c: self.read(c * header.chunk_bytes, header.chunk_bytes),
                                self.size // header.chunk_bytes, self.path, origin_chunks)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._buf is not None:
            self._buf.close()
            self._buf = None

    def __enter__(self) -> "CowDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mark_exceptions(dirty, table: ExceptionTable) -> None:
    """Mark the DirtyMap chunks (any size) that the table's copied origin chunks overlap."""
    cb = table.header.chunk_bytes
    size_limit = dirty.nchunks * dirty.chunk_size
    for old in sorted(set(table.old_chunks())):
        start = old * cb
        if start >= size_limit:
            continue
        dirty.mark_bytes(start, min(cb, size_limit - start))
