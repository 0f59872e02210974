"""The era metadata reader against real dm-era metadata (captured on the lab kernel by data/era_capture.py)
and against synthetic images with multi-level btrees and damage.

The captured images hold writes in known eras: ``writes_by_era`` in data/era-capture.json. In
``era-held-snapshot``, a metadata snapshot was taken at the start of era 5 (it holds eras <= 4) and
writes went on in eras 5 and 6; ``era-closed`` is the same metadata after the device was removed.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest

from blocktrack.errors import MetadataError
from blocktrack.kernel.era_metadata import (ARRAY_CSUM_XOR, BLOCK_SIZE, BTREE_CSUM_XOR, SUPERBLOCK_CSUM_XOR,
                                            SUPERBLOCK_MAGIC, BytesSource, EraMetadata, crc32c_update, dm_checksum)

DATA = Path(__file__).parent / "data"
CAPTURE = json.loads((DATA / "era-capture.json").read_text())
NR = CAPTURE["nr_blocks"]


def image(name: str) -> bytes:
    return gzip.decompress((DATA / name).read_bytes())


def expected_since(threshold: int, up_to_era: int) -> list[int]:
    """Blocks whose last write in eras <= up_to_era was in era >= threshold (era 0: every block)."""
    last = {}
    for era, chunks in sorted(((int(e), c) for e, c in CAPTURE["writes_by_era"].items())):
        if era <= up_to_era:
            for c in chunks:
                last[c] = era
    if threshold == 0:
        return list(range(NR))
    return sorted(b for b, era in last.items() if era >= threshold)


def test_crc32c_is_the_kernel_crc32c():
    # CRC-32C("123456789") is 0xE3069283; the kernel's crc32c() skips the final inversion.
    assert crc32c_update(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283


def test_captured_superblocks():
    held = EraMetadata(BytesSource(image("era-held-snapshot.img.gz")))
    live = held.superblock(0)
    assert (live.data_block_size, live.nr_blocks, live.metadata_snap) == (2048, NR, CAPTURE["held_snapshot_location"])
    snap = held.superblock(CAPTURE["held_snapshot_location"])
    # The snapshot's superblock names the era that started when it was taken: the next checkpoint.
    assert snap.current_era == CAPTURE["era_after_snapshot"]
    closed = EraMetadata(BytesSource(image("era-closed.img.gz"))).superblock(0)
    assert closed.metadata_snap == 0 and closed.current_era == CAPTURE["final_era"]


@pytest.mark.parametrize("threshold", range(0, 8))
def test_reader_reads_the_held_snapshot(threshold):
    md = EraMetadata(BytesSource(image("era-held-snapshot.img.gz")))
    sb = md.superblock(CAPTURE["held_snapshot_location"])
    assert md.written_since(sb, threshold) == expected_since(threshold, sb.current_era - 1)


@pytest.mark.parametrize("threshold", range(0, 8))
def test_reader_matches_era_invalidate_on_live_metadata(threshold):
    """Where era_invalidate reads what it means to (the live superblock), our reader agrees with it."""
    for name, key in (("era-held-snapshot.img.gz", "held-snapshot/live"), ("era-closed.img.gz", "closed/live")):
        md = EraMetadata(BytesSource(image(name)))
        assert md.written_since(md.superblock(0), threshold) == CAPTURE["era_invalidate"][key][str(threshold)], name


def test_era_invalidate_ignores_the_metadata_snapshot():
    """The evidence kept beside the images: thin-provisioning-tools 0.9.0 answers --metadata-snapshot
    from the live superblock, listing blocks 5 and 6, written after the snapshot was taken."""
    tool = CAPTURE["era_invalidate"]
    assert CAPTURE["tools"].startswith("0.")
    assert tool["held-snapshot/--metadata-snapshot"] == tool["held-snapshot/live"]
    assert 5 in tool["held-snapshot/--metadata-snapshot"]["1"]
    assert 5 not in expected_since(1, CAPTURE["era_after_snapshot"] - 1)


@pytest.mark.parametrize("offset", [0, 100, 4095])
def test_damaged_superblock_is_refused(offset):
    data = bytearray(image("era-closed.img.gz"))
    data[offset] ^= 0x40
    with pytest.raises(MetadataError):
        EraMetadata(BytesSource(bytes(data))).superblock(0)


def test_damaged_tree_block_is_refused():
    data = bytearray(image("era-closed.img.gz"))
    md = EraMetadata(BytesSource(bytes(data)))
    root = md.superblock(0).era_array_root
    data[root * BLOCK_SIZE + 200] ^= 1
    md = EraMetadata(BytesSource(bytes(data)))
    with pytest.raises(MetadataError, match="checksum"):
        md.written_since(md.superblock(0), 1)


def test_unformatted_metadata_is_refused():
    with pytest.raises(MetadataError, match="never formatted"):
        EraMetadata(BytesSource(bytes(BLOCK_SIZE * 4))).superblock(0)


# -- synthetic images: two-level btrees, writesets not yet digested ---------------------------------

class Image:
    """Builds era metadata block by block, with the kernel's checksums."""

    def __init__(self, nblocks: int = 64):
        self.blocks = [bytes(BLOCK_SIZE)] * nblocks
        self.next = 1

    def alloc(self) -> int:
        self.next += 1
        return self.next - 1

    def put(self, loc: int, data: bytes, xor: int) -> None:
        data = data.ljust(BLOCK_SIZE, b"\0")
        self.blocks[loc] = struct.pack("<I", dm_checksum(data[4:], xor)) + data[4:]

    def node(self, keys, values: bytes, value_size: int, leaf: bool, max_entries: int = 126) -> int:
        loc = self.alloc()
        body = struct.pack("<IIQIIII", 0, 2 if leaf else 1, loc, len(keys), max_entries, value_size, 0)
        body += struct.pack(f"<{len(keys)}Q", *keys).ljust(8 * max_entries, b"\0") + values
        self.put(loc, body, BTREE_CSUM_XOR)
        return loc

    def btree(self, items: list[tuple[int, bytes]], value_size: int, fanout: int = 3) -> int:
        """A two-level tree when there are more than ``fanout`` items."""
        if not items:
            return self.node([], b"", value_size, leaf=True)
        leaves = []
        for i in range(0, len(items), fanout):
            chunk = items[i:i + fanout]
            leaves.append((chunk[0][0], self.node([k for k, _ in chunk], b"".join(v for _, v in chunk),
                                                  value_size, leaf=True)))
        if len(leaves) == 1:
            return leaves[0][1]
        return self.node([k for k, _ in leaves], struct.pack(f"<{len(leaves)}Q", *[l for _, l in leaves]), 8,
                         leaf=False)

    def array(self, values: list[int], fmt: str, per_block: int) -> int:
        size = struct.calcsize("<" + fmt)
        items = []
        for i in range(0, len(values), per_block):
            chunk = values[i:i + per_block]
            loc = self.alloc()
            body = struct.pack("<IIIIQ", 0, per_block, len(chunk), size, loc) + struct.pack(f"<{len(chunk)}{fmt}", *chunk)
            self.put(loc, body, ARRAY_CSUM_XOR)
            items.append((i // per_block, struct.pack("<Q", loc)))
        return self.btree(items, 8)

    def bitset(self, bits: set[int], nr_bits: int, per_block: int) -> int:
        words = [0] * -(-nr_bits // 64)
        for b in bits:
            words[b // 64] |= 1 << (b % 64)
        return self.array(words, "Q", per_block)

    def superblock(self, loc: int, nr_blocks: int, era: int, ws_root: int, array_root: int) -> None:
        body = struct.pack("<IIQ16sQI128sIIIIIQQQQ", 0, 0, loc, bytes(16), SUPERBLOCK_MAGIC, 1, bytes(128), 2048, 8,
                           nr_blocks, era, nr_blocks, 0, ws_root, array_root, 0)
        self.put(loc, body, SUPERBLOCK_CSUM_XOR)

    def bytes(self) -> bytes:
        return b"".join(self.blocks)


def test_two_level_trees_and_undigested_writesets():
    nr = 300
    eras = [0] * nr
    for b in range(0, nr, 7):
        eras[b] = 3                               # digested: last written in era 3
    eras[299] = 9
    img = Image()
    array_root = img.array(eras, "I", per_block=40)     # 8 array blocks: a two-level index tree
    writesets = {10: {1, 2, 150}, 11: {2, 299}, 12: set(range(64, 130))}
    items = [(era, struct.pack("<IQ", nr, img.bitset(bits, nr, per_block=2))) for era, bits in sorted(writesets.items())]
    items.append((13, struct.pack("<IQ", nr, img.bitset(set(), nr, per_block=2))))
    ws_root = img.btree(items, 12, fanout=2)
    img.superblock(0, nr, 14, ws_root, array_root)
    md = EraMetadata(BytesSource(img.bytes()))
    sb = md.superblock(0)
    assert [w.era for w in md.writesets(sb)] == [10, 11, 12, 13]
    assert md.written_since(sb, 12) == sorted(writesets[12])
    assert md.written_since(sb, 10) == sorted({1, 2, 150, 299} | writesets[12])
    assert md.written_since(sb, 9) == sorted({1, 2, 150, 299} | writesets[12])
    assert md.written_since(sb, 3) == sorted(set(range(0, nr, 7)) | {1, 2, 150, 299} | writesets[12])
    assert md.written_since(sb, 14) == []


def test_missing_array_block_is_refused():
    img = Image()
    full = img.array(list(range(30)), "I", per_block=10)          # array blocks 0, 1, 2 in one leaf
    md = EraMetadata(BytesSource(img.bytes()))
    items = list(md.btree_items(full, 8))
    root = img.btree([items[0], items[2]], 8)                      # index 1 missing
    img.superblock(0, 30, 2, img.btree([], 12), root)
    md = EraMetadata(BytesSource(img.bytes()))
    with pytest.raises(MetadataError, match="missing"):
        md.era_array(md.superblock(0))


def test_node_in_the_wrong_place_is_refused():
    img = Image()
    root = img.array([1, 2, 3], "I", per_block=10)
    img.superblock(0, 3, 2, img.btree([], 12), root)
    data = bytearray(img.bytes())
    moved = data[root * BLOCK_SIZE:(root + 1) * BLOCK_SIZE]
    data[50 * BLOCK_SIZE:51 * BLOCK_SIZE] = moved                       # a copy at another location
    md = EraMetadata(BytesSource(bytes(data)))
    sb = md.superblock(0)
    with pytest.raises(MetadataError, match="lives at block"):
        list(md.btree_items(50, 8))
    assert md.era_array(sb) == [1, 2, 3]
