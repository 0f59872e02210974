"""Chunk digests for verification: XXH3-128 of a chunk's bytes inside the device.

Both ends hash the same thing: the first ``min(chunk_size, size - offset)`` bytes of chunk i (the
last chunk of a device may be short; the wire pads it, the digest does not).

By default (``--verify digest``) each end keeps a ``DigestMap``: one digest per chunk of the
device, taken from data the process already holds, so nothing is read again for it. The sender
records each chunk's digest right after sending it, the receiver right after receiving it, from the
same buffer while it is still in the CPU's cache (XXH3 runs ~20 GB/s on cached data here, ~3.7 GB/s
on data only in memory, as an O_DIRECT read leaves it); on a resume the receiver reads the chunks it
already holds back from the target (never from a saved file), and the sender reads the source's
(both hashed in the C core's I/O threads: that data is cold anyway). At the cutover
the receiver returns its whole map, and only a map equal to the sender's, chunk for chunk, is
success. ``--verify full`` instead reads both devices whole after the final flush
(``digest_chunks``).
"""

from __future__ import annotations

from typing import Iterable

import xxhash

from blocktrack.directio import DIGEST_SIZE, ChunkReader
from blocktrack.dirtymap import DirtyMap


def chunk_digest(data) -> bytes:
    return xxhash.xxh3_128_digest(data)


def digest_chunks(path: str, indexes: Iterable[int], *, chunk_size: int, size: int, depth: int = 8,
                  each=None) -> dict[int, bytes]:
    """Read the chunks ``indexes`` of ``path`` (O_DIRECT) and hash the part of each inside ``size``
    (in the C core's I/O threads). ``each()``, if given, is called after every chunk (a caller's
    liveness check)."""
    digests: dict[int, bytes] = {}
    with ChunkReader(path, chunk_size=chunk_size, depth=depth) as reader:
        for index, _data, digest in reader.read_digested(indexes, size):
            digests[index] = digest
            if each is not None:
                each()
    return digests


class DigestMap:
    """The digest of every chunk of a device as this end last sent, wrote or read it.

    ``raw`` is the RESULT message's layout (wire/control.py): 16 bytes per chunk in chunk order, so
    the whole map goes on the wire and is compared as one buffer. ``known`` marks the chunks that
    have a digest; an unknown chunk's slot stays zero (no XXH3-128 digest of real data is expected to be).
    """

    def __init__(self, nchunks: int, chunk_size: int, size: int):
        self.nchunks, self.chunk_size, self.size = nchunks, chunk_size, size
        self.raw = bytearray(nchunks * DIGEST_SIZE)
        self._view = memoryview(self.raw)
        self.known = DirtyMap(nchunks, chunk_size)
        self._zero: dict[int, bytes] = {}

    def length(self, index: int) -> int:
        """Bytes of chunk ``index`` inside the device."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def set(self, index: int, digest: bytes) -> None:
        self._view[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE] = digest
        self.known.mark(index)

    def set_zero(self, index: int) -> None:
        """Chunk ``index`` is all zeros (a zero chunk sent or written as such: nothing to hash)."""
        length = self.length(index)
        if length not in self._zero:
            self._zero[length] = chunk_digest(bytes(length))
        self.set(index, self._zero[length])

    def slot(self, index: int) -> memoryview:
        """The 16 bytes of chunk ``index``'s digest, to be filled by an I/O thread (ChunkWriter.submit's
        ``digest_into``); the chunk counts as known from now on."""
        self.known.mark(index)
        return self._view[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]

    def get(self, index: int) -> bytes | None:
        return bytes(self._view[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]) if self.known.test(index) else None

    def missing(self) -> list[int]:
        """Chunks without a digest."""
        if self.known.count() == self.nchunks:
            return []
        return [i for i in range(self.nchunks) if not self.known.test(i)]

    def differ(self, other) -> list[int]:
        """Chunks whose digest in ``other`` (a map's raw bytes) is not this map's."""
        if len(other) != len(self.raw):
            raise ValueError(f"a digest map of {len(other) // DIGEST_SIZE} chunks against one of {self.nchunks}")
        if other == self.raw:
            return []
        theirs = memoryview(other)
        return [i for i in range(self.nchunks)
                if theirs[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] != self._view[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]]


def chunk_list(indexes: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indexes[:limit])
    return shown + (f" and {len(indexes) - limit} more" if len(indexes) > limit else "")
