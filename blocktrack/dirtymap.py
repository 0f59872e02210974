"""DirtyMap: one bit per chunk of a device, set when the chunk may differ from the copy sent.

The bits live in the C core (``csrc/bt_bitmap.c``): marking is a single atomic OR and runs with
the GIL released, so marking threads (NBD server connections, a backend's poller) never take a
Python lock, and ``snapshot_and_clear`` moves each set bit into the snapshot exactly once even while
they run. The sender takes a snapshot, then reads the chunks it names; a write racing the read marks
its chunk again (ARCHITECTURE.md, invariant 1).

``save``/``load`` keep a map across restarts (resume). File layout, all little-endian:

    offset  size  field
    0       8     magic  b"BTDIRTY\\n"
    8       4     version (1)
    12      4     reserved, 0
    16      8     chunk_size in bytes
    24      8     nchunks (bits)
    32      8*W   W = ceil(nchunks / 64) words; bit i is bit (i % 64) of word i // 64
    32+8W   4     zlib.crc32 of every byte before it

The file is replaced atomically (temp file, fsync, rename, fsync of the directory); a file that is
truncated, has a wrong magic, version or checksum, or sets bits past nchunks is refused with
``DirtyMapFileError``.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import zlib
from typing import Iterator

from blocktrack.atomicfile import atomic_write
from blocktrack.safepath import read_file
from blocktrack._native import ffi, lib
from blocktrack.errors import BlocktrackError, check

MAGIC = b"BTDIRTY\n"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")
_CRC = struct.Struct("<I")
_COLLECT_BATCH = 4096
# bt_bitmap_next_* return -ENOENT for "no such bit": an answer, not a failure.
_ENOENT = errno.ENOENT


class DirtyMapFileError(BlocktrackError):
    """A saved dirty map cannot be used: truncated, corrupt, or not a dirty map at all."""

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"dirty map file {self.path}: {reason}")


def _new_bitmap(nbits: int):
    bm = ffi.new("struct bt_bitmap *")
    check(lib.bt_bitmap_init(bm, nbits), "allocate dirty map")
    # Freed with the Python object; the destructor gets the same struct pointer.
    return ffi.gc(bm, lib.bt_bitmap_free)


class DirtyMap:
    """One bit per ``chunk_size`` bytes; marking is thread-safe."""

    def __init__(self, nchunks: int, chunk_size: int = 1 << 20):
        if nchunks < 0:
            raise ValueError(f"nchunks must be >= 0, got {nchunks}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        self.nchunks = int(nchunks)
        self.chunk_size = int(chunk_size)
        self._bm = _new_bitmap(self.nchunks)

    @classmethod
    def for_size(cls, size_bytes: int, chunk_size: int = 1 << 20) -> "DirtyMap":
        """A map covering ``size_bytes``; a short tail still gets its own chunk."""
        if size_bytes < 0:
            raise ValueError(f"size must be >= 0, got {size_bytes}")
        return cls(-(-size_bytes // chunk_size), chunk_size)

    # -- marking ---------------------------------------------------------------------------------

    def _check_range(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.nchunks:
            raise IndexError(f"chunks [{first}, {first + count}) outside a map of {self.nchunks} chunks")

    def mark(self, first: int, count: int = 1) -> None:
        self._check_range(first, count)
        check(lib.bt_bitmap_set_range(self._bm, first, count), "mark dirty chunks")

    def mark_bytes(self, offset: int, length: int) -> None:
        """Mark every chunk that the byte range ``[offset, offset + length)`` touches."""
        if offset < 0 or length < 0:
            raise IndexError(f"byte range {offset}+{length} is negative")
        if length == 0:
            return
        first = offset // self.chunk_size
        last = (offset + length - 1) // self.chunk_size
        self.mark(first, last - first + 1)

    def mark_all(self) -> None:
        check(lib.bt_bitmap_set_range(self._bm, 0, self.nchunks), "mark dirty chunks")

    def clear(self, first: int, count: int = 1) -> None:
        self._check_range(first, count)
        check(lib.bt_bitmap_clear_range(self._bm, first, count), "clear dirty chunks")

    # -- queries ---------------------------------------------------------------------------------

    def test(self, index: int) -> bool:
        if not 0 <= index < self.nchunks:
            raise IndexError(f"chunk {index} outside a map of {self.nchunks} chunks")
        return bool(check(lib.bt_bitmap_test(self._bm, index), "test dirty chunk"))

    def count(self) -> int:
        return check(lib.bt_bitmap_count(self._bm), "count dirty chunks")

    def __len__(self) -> int:
        return self.nchunks

    def next_set(self, start: int) -> int | None:
        """The first set chunk at or after ``start``, or None."""
        if start < 0:
            raise IndexError(f"start {start} is negative")
        rc = lib.bt_bitmap_next_set(self._bm, start)
        return None if rc == -_ENOENT else check(rc, "find dirty chunk")

    def next_clear(self, start: int) -> int | None:
        """The first clean chunk at or after ``start``, or None."""
        if start < 0:
            raise IndexError(f"start {start} is negative")
        rc = lib.bt_bitmap_next_clear(self._bm, start)
        return None if rc == -_ENOENT else check(rc, "find clean chunk")

    def __iter__(self) -> Iterator[int]:
        """Set chunks in ascending order (bits set or cleared during iteration may or may not show)."""
        out = ffi.new("uint64_t[]", _COLLECT_BATCH)
        start = 0
        while True:
            n = check(lib.bt_bitmap_collect(self._bm, start, out, _COLLECT_BATCH), "list dirty chunks")
            if n == 0:
                return
            batch = ffi.unpack(out, n)
            yield from batch
            start = batch[-1] + 1

    def ranges(self) -> list[list[int]]:
        """Runs of set chunks as inclusive ``[first, last]`` pairs, ascending."""
        runs = []
        start = self.next_set(0)
        while start is not None:
            end = self.next_clear(start)
            last = (self.nchunks if end is None else end) - 1
            runs.append([start, last])
            start = None if end is None else self.next_set(end)
        return runs

    def __repr__(self) -> str:
        return f"DirtyMap(nchunks={self.nchunks}, chunk_size={self.chunk_size}, set={self.count()})"

    # -- taking the dirty set --------------------------------------------------------------------

    def snapshot_and_clear(self) -> "DirtyMap":
        """Move every set bit into a new map and clear it here, atomically per bit: a chunk marked
        while this runs ends up in exactly one of the two maps."""
        snap = DirtyMap(self.nchunks, self.chunk_size)
        check(lib.bt_bitmap_snapshot_clear(self._bm, snap._bm), "snapshot dirty map")
        return snap

    # -- persistence -----------------------------------------------------------------------------

    def _words(self) -> bytes:
        nwords = self._bm.nwords
        words = ffi.new("uint64_t[]", max(nwords, 1))
        check(lib.bt_bitmap_copy_out(self._bm, words, nwords), "copy dirty map")
        data = ffi.buffer(words, nwords * 8)[:]
        return data if sys.byteorder == "little" else _byteswap_words(data)

    def save(self, path) -> None:
        """Write the map to ``path`` atomically (see the module docstring for the layout)."""
        path = os.fspath(path)
        body = _HEADER.pack(MAGIC, VERSION, 0, self.chunk_size, self.nchunks) + self._words()
        data = body + _CRC.pack(zlib.crc32(body))
        atomic_write(path, data, mode=0o600, what="save dirty map")

    @classmethod
    def load(cls, path) -> "DirtyMap":
        """Read a map written by ``save``; raise DirtyMapFileError when it is damaged."""
        path = os.fspath(path)
        try:
            data = read_file(path)          # O_NOFOLLOW: a link planted in a state folder is refused
        except OSError as e:
            check(-(e.errno or 5), "load dirty map", path)
            raise
        if len(data) < _HEADER.size + _CRC.size:
            raise DirtyMapFileError(path, f"truncated: {len(data)} bytes, shorter than the header")
        magic, version, _reserved, chunk_size, nchunks = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise DirtyMapFileError(path, f"not a dirty map (magic {magic!r})")
        if version != VERSION:
            raise DirtyMapFileError(path, f"unsupported version {version} (this blocktrack reads {VERSION})")
        nwords = -(-nchunks // 64)
        expected = _HEADER.size + 8 * nwords + _CRC.size
        if len(data) != expected:
            what = "truncated" if len(data) < expected else "has trailing bytes"
            raise DirtyMapFileError(path, f"{what}: {len(data)} bytes, expected {expected} "
                                          f"for {nchunks} chunks")
        body, (crc,) = data[:-_CRC.size], _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(body) != crc:
            raise DirtyMapFileError(path, "checksum mismatch: the file is corrupt")
        if chunk_size == 0:
            raise DirtyMapFileError(path, "chunk size is 0")
        words = body[_HEADER.size:]
        if sys.byteorder != "little":
            words = _byteswap_words(words)
        dm = cls(nchunks, chunk_size)
        cwords = ffi.new("uint64_t[]", max(nwords, 1))
        ffi.memmove(cwords, words, len(words))
        if lib.bt_bitmap_copy_in(dm._bm, cwords, nwords) < 0:
            raise DirtyMapFileError(path, f"bits set past the last chunk ({nchunks})")
        return dm


def _byteswap_words(data: bytes) -> bytes:
    import array

    a = array.array("Q", data)
    a.byteswap()
    return a.tobytes()
