"""Metadata contexts: query matching, and dirty-bitmap extents against a model (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrack.dirtymap import DirtyMap
from blocktrack.nbd import metacontext as mc
from blocktrack.nbd.protocol import NBD_STATE_DIRTY


def test_list_with_no_query_lists_everything():
    assert mc.list_contexts([]) == ["base:allocation", "qemu:dirty-bitmap:blocktrack"]


@pytest.mark.parametrize("query, listed", [
    ("base:", ["base:allocation"]),
    ("base:allocation", ["base:allocation"]),
    ("base:other", []),
    ("qemu:", ["qemu:dirty-bitmap:blocktrack"]),
    ("qemu:dirty-bitmap:", ["qemu:dirty-bitmap:blocktrack"]),
    ("qemu:dirty-bitmap:blocktrack", ["qemu:dirty-bitmap:blocktrack"]),
    ("qemu:dirty-bitmap:other", []),
    ("qemu:allocation-depth", []),
    ("x-vendor:thing", []),
])
def test_list_queries(query, listed):
    assert mc.list_contexts([query]) == listed


def test_set_selects_exact_names_once_and_ignores_wildcards():
    selected = mc.select_contexts(["base:", "qemu:", "qemu:dirty-bitmap:blocktrack", "base:allocation",
                                   "base:allocation", "x-other:a"])
    assert [c.name for c in selected] == ["qemu:dirty-bitmap:blocktrack", "base:allocation"]
    assert len({c.context_id for c in selected}) == 2
    assert mc.select_contexts([]) == []


@pytest.mark.parametrize("query", ["", "nocolon", ":leaf"])
def test_queries_without_a_namespace_are_invalid(query):
    with pytest.raises(mc.InvalidQuery):
        mc.list_contexts([query])
    with pytest.raises(mc.InvalidQuery):
        mc.select_contexts([query])


CHUNK = 4096


@st.composite
def maps_and_ranges(draw):
    nchunks = draw(st.integers(1, 300))
    size = draw(st.integers((nchunks - 1) * CHUNK + 1, nchunks * CHUNK))   # a short last chunk
    dirty = draw(st.sets(st.integers(0, nchunks - 1)))
    offset = draw(st.integers(0, size - 1))
    end = draw(st.integers(offset + 1, size))
    limit = draw(st.integers(1, 400))
    return nchunks, size, dirty, offset, end, limit


@settings(max_examples=300)
@given(maps_and_ranges())
def test_dirty_extents_match_the_bits(case):
    nchunks, _size, dirty, offset, end, limit = case
    dm = DirtyMap(nchunks, CHUNK)
    for i in dirty:
        dm.mark(i)
    extents = mc.dirty_extents(dm, offset, end, limit)
    assert 1 <= len(extents) <= limit
    pos = offset
    for i, (length, flags) in enumerate(extents):
        assert length > 0
        stop = pos + length
        assert stop <= end
        # Every chunk the extent touches has the extent's state; neighbours differ (maximal runs).
        for chunk in range(pos // CHUNK, (stop - 1) // CHUNK + 1):
            assert (chunk in dirty) == bool(flags & NBD_STATE_DIRTY)
        if i:
            assert flags != extents[i - 1][1]
        if stop < end:
            assert stop % CHUNK == 0        # runs end on chunk boundaries, except at the range end
        pos = stop
    if len(extents) < limit:
        assert pos == end                    # the whole range is described unless the limit cut it


def test_req_one_clips_to_the_request():
    assert mc.clip_one([(10 << 20, 1), (5, 0)], 4096) == [(4096, 1)]
    assert mc.clip_one([(100, 0)], 4096) == [(100, 0)]
