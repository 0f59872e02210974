"""Chunk digests for verification: XXH3-128 of a chunk's bytes inside the device.

Both ends hash the same thing: the first ``min(chunk_size, size - offset)`` bytes of chunk i (the
last chunk of a device may be short; the wire pads it, the digest does not). The sender hashes the
frozen source, the receiver what it reads back from the target after its final flush.
"""

from __future__ import annotations

from typing import Iterable

import xxhash

from blocktrack.directio import ChunkReader


def chunk_digest(data) -> bytes:
    return xxhash.xxh3_128_digest(data)


def digest_chunks(path: str, indexes: Iterable[int], *, chunk_size: int, size: int, depth: int = 8) -> dict[int, bytes]:
    """Read the chunks ``indexes`` of ``path`` (O_DIRECT) and hash the part of each inside ``size``."""
    digests: dict[int, bytes] = {}
    with ChunkReader(path, chunk_size=chunk_size, depth=depth) as reader:
        for index, data in reader.read(indexes):
            real = min(chunk_size, size - index * chunk_size)
            digests[index] = chunk_digest(data[:real])
    return digests


def compare(expected: dict[int, bytes], got: dict[int, bytes]) -> tuple[list[int], list[int], list[int]]:
    """(chunks whose digests differ, chunks missing from ``got``, chunks ``got`` has in excess)."""
    differ = sorted(i for i, d in expected.items() if i in got and got[i] != d)
    missing = sorted(i for i in expected if i not in got)
    extra = sorted(i for i in got if i not in expected)
    return differ, missing, extra


def chunk_list(indexes: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indexes[:limit])
    return shown + (f" and {len(indexes) - limit} more" if len(indexes) > limit else "")
