"""A reader of dm-era's on-disk metadata: which era each block was last written in.

Why our own reader. The standard answer to "which blocks changed since era E" is
``era_invalidate --written-since E --metadata-snapshot DEV`` from thin-provisioning-tools. The version
Debian 12 ships (0.9.0) ignores ``--metadata-snapshot``: ``era::metadata(bm, metadata_snap)`` calls
``open_metadata(bm)`` at the *live* superblock, so it reads trees the kernel is changing under it, and
lists blocks written after the snapshot was taken (tests/kernel/test_dm_era.py shows both). We read the
held snapshot ourselves, and check every block's checksum and location on the way, as the kernel does.

Layout (drivers/md/dm-era-target.c and drivers/md/persistent-data/, all little-endian, 4 KiB blocks):

* superblock (block 0 live; the held metadata snapshot is a shadow copy at the block the era target
  reports in its status)::

      le32 csum           crc32c of bytes 4..4095, xor 146538381
      le32 flags
      le64 blocknr        where this block lives
      u8   uuid[16]
      le64 magic          2126579579
      le32 version        1
      u8   space_map_root[128]
      le32 data_block_size      sectors per era block
      le32 metadata_block_size  sectors (8)
      le32 nr_blocks
      le32 current_era
      le32 current_writeset.nr_bits; le64 current_writeset.root
      le64 writeset_tree_root   (valid in the snapshot)
      le64 era_array_root       (valid in the snapshot)
      le64 metadata_snap        location of the held snapshot, 0 for none

* writeset tree: a btree (one level) keyed by era, values ``{le32 nr_bits; le64 root}`` (12 bytes): the
  writesets of eras that ended and are not yet folded into the era array. Each root is a bitset.
* era array: a dm-array of le32, one per block: the last era in which it was written (0: never).
* btree node: ``le32 csum (xor 121107); le32 flags (1 internal, 2 leaf); le64 blocknr; le32 nr_entries;
  le32 max_entries; le32 value_size; le32 padding;`` then ``le64 keys[max_entries]``, then
  ``values[max_entries]``. Internal values are le64 child locations.
* dm-array: a btree mapping array-block index -> le64 location of an array block:
  ``le32 csum (xor 595846735); le32 max_entries; le32 nr_entries; le32 value_size; le64 blocknr;``
  then the packed values.
* bitset: a dm-array of le64 words; bit i is bit (i % 64) of word i // 64.

The era target folds ("digests") each archived writeset into the era array in the background, a
hundred bits at a time, and removes it from the tree only when done. So the blocks written in era E or
later are those whose era-array entry is >= E, together with every bit of every writeset still in the
tree with era >= E -- exactly what era_invalidate computes.

Checksums: ``dm_bm_checksum(data, len, xor) = crc32c_update(~0, data, len) ^ xor`` with the kernel's
crc32c, which applies no final inversion (so it is the complement of the usual CRC-32C value).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Iterator

from blocktrack.errors import MetadataError, check

BLOCK_SIZE = 4096
SUPERBLOCK_MAGIC = 2126579579
SUPERBLOCK_CSUM_XOR = 146538381
BTREE_CSUM_XOR = 121107
ARRAY_CSUM_XOR = 595846735
ERA_VERSION = 1
INTERNAL_NODE = 1
LEAF_NODE = 2

_SB = struct.Struct("<IIQ16sQI128sIIIIIQQQQ")
_NODE_HEADER = struct.Struct("<IIQIIII")
_ARRAY_HEADER = struct.Struct("<IIIIQ")
_WRITESET = struct.Struct("<IQ")

# -- crc32c (Castagnoli, reflected polynomial 0x82F63B78), as the kernel's crc32c() ---------------

def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _make_table()


def crc32c_update(crc: int, data: bytes) -> int:
    """The kernel's ``crc32c(crc, data, len)``: the raw reflected update, no final inversion."""
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def dm_checksum(data: bytes, xor: int) -> int:
    return crc32c_update(0xFFFFFFFF, data) ^ xor


# -- where the blocks come from ----------------------------------------------------------------------

class BlockSource:
    """Reads whole 4 KiB metadata blocks. ``path`` names the source in error messages."""

    path = "<metadata>"

    def read(self, location: int) -> bytes:
        raise NotImplementedError

    def nr_blocks(self) -> int:
        raise NotImplementedError


class BytesSource(BlockSource):
    """An in-memory image (tests)."""

    def __init__(self, data: bytes, path: str = "<image>"):
        self.data = data
        self.path = path

    def nr_blocks(self) -> int:
        return len(self.data) // BLOCK_SIZE

    def read(self, location: int) -> bytes:
        if not 0 <= location < self.nr_blocks():
            raise MetadataError(self.path, "metadata block beyond the end of the image", location)
        return self.data[location * BLOCK_SIZE:(location + 1) * BLOCK_SIZE]


class DeviceSource(BlockSource):
    """The metadata device, read with O_DIRECT: the kernel writes it through dm-bufio, past the page
    cache, so a buffered read could return a stale copy of a block read earlier."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            check(-(e.errno or 5), "open era metadata", path)
            raise
        self._buf = mmap.mmap(-1, BLOCK_SIZE)        # page aligned, as O_DIRECT wants
        self._size = os.lseek(self.fd, 0, os.SEEK_END)

    def nr_blocks(self) -> int:
        return self._size // BLOCK_SIZE

    def read(self, location: int) -> bytes:
        if not 0 <= location < self.nr_blocks():
            raise MetadataError(self.path, "metadata block beyond the end of the device", location)
        try:
            n = os.preadv(self.fd, [self._buf], location * BLOCK_SIZE)
        except OSError as e:
            check(-(e.errno or 5), "read era metadata", self.path, location * BLOCK_SIZE)
            raise
        if n != BLOCK_SIZE:
            raise MetadataError(self.path, f"short read ({n} bytes)", location)
        return bytes(self._buf)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._buf.close()

    def __enter__(self) -> "DeviceSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the structures --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Superblock:
    location: int
    flags: int
    data_block_size: int            # sectors per era block
    metadata_block_size: int        # sectors
    nr_blocks: int
    current_era: int
    current_writeset_bits: int
    current_writeset_root: int
    writeset_tree_root: int
    era_array_root: int
    metadata_snap: int


@dataclass(frozen=True)
class Writeset:
    era: int
    nr_bits: int
    root: int


def parse_superblock(block: bytes, location: int, path: str = "<metadata>") -> Superblock:
    if len(block) != BLOCK_SIZE:
        raise MetadataError(path, f"superblock is {len(block)} bytes, not {BLOCK_SIZE}", location)
    (csum, flags, blocknr, _uuid, magic, version, _smroot, data_block_size, md_block_size, nr_blocks,
     current_era, ws_bits, ws_root, ws_tree_root, era_array_root, metadata_snap) = _SB.unpack_from(block)
    if not any(block):
        raise MetadataError(path, "no era metadata here (the block is all zeroes: never formatted)", location)
    if magic != SUPERBLOCK_MAGIC:
        raise MetadataError(path, f"not era metadata (superblock magic {magic}, expected {SUPERBLOCK_MAGIC})",
                            location)
    if blocknr != location:
        raise MetadataError(path, f"superblock says it lives at block {blocknr}", location)
    if dm_checksum(block[4:], SUPERBLOCK_CSUM_XOR) != csum:
        raise MetadataError(path, "superblock checksum mismatch", location)
    if version != ERA_VERSION:
        raise MetadataError(path, f"era metadata version {version} (this reader knows {ERA_VERSION})", location)
    if md_block_size != BLOCK_SIZE // 512:
        raise MetadataError(path, f"metadata block size {md_block_size} sectors (expected 8)", location)
    return Superblock(location, flags, data_block_size, md_block_size, nr_blocks, current_era, ws_bits, ws_root,
                      ws_tree_root, era_array_root, metadata_snap)


class EraMetadata:
    """Walks era metadata from one block source, checking each block as the kernel's validators do."""

    def __init__(self, source: BlockSource):
        self.source = source
        self.path = source.path

    def superblock(self, location: int = 0) -> Superblock:
        return parse_superblock(self.source.read(location), location, self.path)

    # -- btrees ----------------------------------------------------------------------------------

    def _node(self, location: int, value_size: int) -> tuple[int, list[int], bytes, int]:
        block = self.source.read(location)
        csum, flags, blocknr, nr_entries, max_entries, vsize, _pad = _NODE_HEADER.unpack_from(block)
        if blocknr != location:
            raise MetadataError(self.path, f"btree node says it lives at block {blocknr}", location)
        if dm_checksum(block[4:], BTREE_CSUM_XOR) != csum:
            raise MetadataError(self.path, "btree node checksum mismatch", location)
        if flags not in (INTERNAL_NODE, LEAF_NODE):
            raise MetadataError(self.path, f"btree node flags {flags}", location)
        expect = 8 if flags == INTERNAL_NODE else value_size
        if vsize != expect:
            raise MetadataError(self.path, f"btree node value size {vsize}, expected {expect}", location)
        if nr_entries > max_entries or _NODE_HEADER.size + max_entries * (8 + vsize) > BLOCK_SIZE:
            raise MetadataError(self.path, f"btree node with {nr_entries}/{max_entries} entries", location)
        keys = list(struct.unpack_from(f"<{nr_entries}Q", block, _NODE_HEADER.size))
        values_at = _NODE_HEADER.size + 8 * max_entries
        return flags, keys, block[values_at:values_at + nr_entries * vsize], vsize

    def btree_items(self, root: int, value_size: int) -> Iterator[tuple[int, bytes]]:
        """(key, value bytes) of a one-level btree, in key order."""
        stack = [(root, 0)]
        seen = set()
        while stack:
            location, depth = stack.pop()
            if location in seen or depth > 32:
                raise MetadataError(self.path, "btree loops back on itself", location)
            seen.add(location)
            flags, keys, values, vsize = self._node(location, value_size)
            if flags == INTERNAL_NODE:
                children = struct.unpack(f"<{len(keys)}Q", values)
                stack.extend((child, depth + 1) for child in reversed(children))
            else:
                for i, key in enumerate(keys):
                    yield key, values[i * vsize:(i + 1) * vsize]

    # -- arrays and bitsets ------------------------------------------------------------------------

    def array_blocks(self, root: int, value_size: int) -> Iterator[tuple[int, int, bytes]]:
        """(index of the first entry, number of entries, packed values) of each block of a dm-array."""
        expected_index = 0
        first = 0
        for index, value in self.btree_items(root, 8):
            if index != expected_index:
                raise MetadataError(self.path, f"array block {expected_index} missing (next is {index})", root)
            expected_index += 1
            (location,) = struct.unpack("<Q", value)
            block = self.source.read(location)
            csum, max_entries, nr_entries, vsize, blocknr = _ARRAY_HEADER.unpack_from(block)
            if blocknr != location:
                raise MetadataError(self.path, f"array block says it lives at block {blocknr}", location)
            if dm_checksum(block[4:], ARRAY_CSUM_XOR) != csum:
                raise MetadataError(self.path, "array block checksum mismatch", location)
            if vsize != value_size or nr_entries > max_entries or \
                    _ARRAY_HEADER.size + max_entries * vsize > BLOCK_SIZE:
                raise MetadataError(self.path, f"array block with {nr_entries}/{max_entries} values of "
                                               f"{vsize} bytes (expected {value_size})", location)
            yield first, nr_entries, block[_ARRAY_HEADER.size:_ARRAY_HEADER.size + nr_entries * vsize]
            first += nr_entries

    def era_array(self, sb: Superblock) -> list[int]:
        """The era of every block (0: never written), ``sb.nr_blocks`` long."""
        eras: list[int] = []
        for _first, count, values in self.array_blocks(sb.era_array_root, 4):
            eras.extend(struct.unpack(f"<{count}I", values))
        if len(eras) < sb.nr_blocks:
            raise MetadataError(self.path, f"era array holds {len(eras)} entries for {sb.nr_blocks} blocks",
                                sb.era_array_root)
        return eras[:sb.nr_blocks]

    def bitset_bits(self, root: int, nr_bits: int) -> Iterator[int]:
        """Indexes of the set bits of an on-disk bitset, below ``nr_bits``."""
        for first, count, values in self.array_blocks(root, 8):
            words = struct.unpack(f"<{count}Q", values)
            for w, word in enumerate(words):
                base = (first + w) * 64
                while word:
                    low = word & -word
                    bit = base + low.bit_length() - 1
                    if bit < nr_bits:
                        yield bit
                    word ^= low

    def writesets(self, sb: Superblock) -> list[Writeset]:
        out = []
        for era, value in self.btree_items(sb.writeset_tree_root, _WRITESET.size):
            nr_bits, root = _WRITESET.unpack(value)
            out.append(Writeset(era, nr_bits, root))
        return out

    # -- the question we ask -------------------------------------------------------------------------

    def written_since(self, sb: Superblock, threshold: int) -> list[int]:
        """Blocks last written in era ``threshold`` or later, ascending (era_invalidate's answer)."""
        nr = sb.nr_blocks
        marked = bytearray(nr)
        for block, era in enumerate(self.era_array(sb)):
            if era >= threshold:
                marked[block] = 1
        for ws in self.writesets(sb):
            if ws.era >= threshold:
                for bit in self.bitset_bits(ws.root, min(ws.nr_bits, nr)):
                    marked[bit] = 1
        return [i for i, m in enumerate(marked) if m]


def read_superblock(path: str, location: int = 0) -> Superblock:
    with DeviceSource(path) as src:
        return EraMetadata(src).superblock(location)
