"""Metadata contexts for NBD_CMD_BLOCK_STATUS: ``base:allocation`` and ``qemu:dirty-bitmap:blocktrack``.

``base:allocation`` (proto.md, "The base: metadata namespace") reports holes of image files
(NBD_STATE_HOLE | NBD_STATE_ZERO) and everything else as allocated data (status 0).

``qemu:dirty-bitmap:blocktrack`` follows QEMU's convention (``docs/interop/nbd.txt``): bit 0,
NBD_STATE_DIRTY, set on extents whose chunks were changed through this server since its dirty map
was last cleared. Extents follow the dirty map's chunks (1 MiB), clipped to the request and the
export's end. A client reads the bits; only blocktrack itself clears them (``snapshot_and_clear``).

Query strings. NBD_OPT_SET_META_CONTEXT selects contexts by their full names; ``base:`` is ignored
there, as the spec requires. NBD_OPT_LIST_META_CONTEXT also accepts the wildcards ``base:``,
``qemu:`` and ``qemu:dirty-bitmap:`` (QEMU's), and with no query lists every context. Queries in
other namespaces, or unknown leaf names, select nothing; a query without a namespace colon is
invalid.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocktrack.dirtymap import DirtyMap
from blocktrack.nbd.protocol import NBD_STATE_DIRTY

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
DIRTY_BITMAP = DIRTY_BITMAP_PREFIX + "blocktrack"

# Wildcards accepted by NBD_OPT_LIST_META_CONTEXT, and what each lists.
_LIST_WILDCARDS = {
    "base:": (BASE_ALLOCATION,),
    "qemu:": (DIRTY_BITMAP,),
    DIRTY_BITMAP_PREFIX: (DIRTY_BITMAP,),
}


class InvalidQuery(ValueError):
    """A query that is not ``namespace:leaf`` (answered with NBD_REP_ERR_INVALID)."""


@dataclass(frozen=True)
class MetaContext:
    """A context as selected on one connection: its name and the id the client will see."""

    name: str
    context_id: int


# Context ids are transient (the spec lets them change across negotiations); fixed ones are simplest.
CONTEXT_IDS = {BASE_ALLOCATION: 1, DIRTY_BITMAP: 2}
ALL_CONTEXTS = tuple(CONTEXT_IDS)


def _check_query(query: str) -> None:
    namespace, colon, _leaf = query.partition(":")
    if not colon or not namespace:
        raise InvalidQuery(f"metadata context query {query!r} has no namespace (expected 'namespace:leaf')")


def list_contexts(queries: list[str]) -> list[str]:
    """Context names for NBD_OPT_LIST_META_CONTEXT (every context when ``queries`` is empty)."""
    if not queries:
        return list(ALL_CONTEXTS)
    found: list[str] = []
    for query in queries:
        _check_query(query)
        for name in _LIST_WILDCARDS.get(query, (query,) if query in CONTEXT_IDS else ()):
            if name not in found:
                found.append(name)
    return found


def select_contexts(queries: list[str]) -> list[MetaContext]:
    """Contexts for NBD_OPT_SET_META_CONTEXT: exact names only, each at most once."""
    selected: list[MetaContext] = []
    for query in queries:
        _check_query(query)
        if query in CONTEXT_IDS and all(c.name != query for c in selected):
            selected.append(MetaContext(query, CONTEXT_IDS[query]))
    return selected


def dirty_extents(dirty: DirtyMap, offset: int, end: int, max_extents: int) -> list[tuple[int, int]]:
    """``qemu:dirty-bitmap`` extents over ``[offset, end)``: runs of dirty (NBD_STATE_DIRTY) and
    clean (0) chunks, at most ``max_extents`` of them (the rest is left for the next request)."""
    chunk = dirty.chunk_size
    extents: list[tuple[int, int]] = []
    pos = offset
    while pos < end and len(extents) < max_extents:
        index = pos // chunk
        if dirty.test(index):
            stop_chunk = dirty.next_clear(index)
            flags = NBD_STATE_DIRTY
        else:
            stop_chunk = dirty.next_set(index)
            flags = 0
        stop = end if stop_chunk is None else min(stop_chunk * chunk, end)
        extents.append((stop - pos, flags))
        pos = stop
    return extents


def clip_one(extents: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """NBD_CMD_FLAG_REQ_ONE: exactly one extent, no longer than the request."""
    first_length, flags = extents[0]
    return [(min(first_length, length), flags)]
