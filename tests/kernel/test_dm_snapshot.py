"""LVM snapshots on the lab kernel: the exception table in the COW device lists exactly the chunks written.

The persistent exception store (drivers/md/dm-snap-persistent.c), little-endian:

* chunk 0: ``struct disk_header { le32 magic = 0x70416e53 ("SnAp"); le32 valid; le32 version = 1;
  le32 chunk_size (sectors); }``
* metadata areas of one chunk each, area ``i`` at chunk ``1 + i * (exceptions_per_area + 1)``, each followed by
  the data chunks it describes; ``exceptions_per_area = chunk_size * 512 / 16``;
* an area holds ``struct disk_exception { le64 old_chunk; le64 new_chunk; }``; the table ends at the first
  entry whose new_chunk is 0; a full area continues in the next one.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import dd_write, out, read_direct, run, settle

SNAP_MAGIC = 0x70416E53
VG = "labsnap"


@dataclass
class CowStore:
    magic: int
    valid: int
    version: int
    chunk_sectors: int
    exceptions: list[tuple[int, int]]        # (old_chunk, new_chunk) in table order
    areas_read: int

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_sectors * 512


def read_cow(dev: str) -> CowStore:
    """Parse the persistent exception store on a snapshot's -cow device, reading past the page cache."""
    magic, valid, version, chunk_sectors = struct.unpack_from("<IIII", read_direct(dev, 0, 4096))
    assert magic == SNAP_MAGIC, f"{dev}: bad magic {magic:#x}"
    chunk = chunk_sectors * 512
    per_area = chunk // 16
    size = int(out("blockdev", "--getsize64", dev))
    exceptions: list[tuple[int, int]] = []
    area = 0
    while True:
        loc = 1 + area * (per_area + 1)
        assert (loc + 1) * chunk <= size, f"{dev}: exception table runs past the device end (area {area})"
        data = read_direct(dev, loc * chunk, chunk)
        for i in range(per_area):
            old, new = struct.unpack_from("<QQ", data, i * 16)
            if new == 0:
                return CowStore(magic, valid, version, chunk_sectors, exceptions, area + 1)
            exceptions.append((old, new))
        area += 1                                # area full: the table goes on in the next one


def lv(name: str) -> str:
    return f"/dev/{VG}/{name}"


@pytest.fixture
def vg(clean_disks):
    vda, _ = clean_disks
    run("pvcreate", "-y", vda)
    run("vgcreate", VG, vda)
    yield VG
    run("vgremove", "-ff", "-y", VG)


CASES = {
    # chunk size (KiB): writes as (offset, length) in bytes, expected chunk numbers
    "64k-chunks": (64, [(3 * 65536, 65536),           # exactly chunk 3
                        (100 * 65536 + 8192, 4096),   # 4 KiB inside chunk 100: the whole chunk is copied
                        (1000 * 65536, 131072)],      # chunks 1000 and 1001
                   {3, 100, 1000, 1001}),
    # 4 KiB chunks: 256 exceptions per area, so 301 exceptions fill the first area and go on in the second.
    "4k-chunks-two-areas": (4, [(20 * 4096, 4096), (5000 * 4096, 300 * 4096)],
                            {20} | set(range(5000, 5300))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_snapshot_cow_exception_table_lists_written_chunks(vg, case):
    chunk_kib, writes, expected = CASES[case]
    run("lvcreate", "-y", "-L", "128M", "-n", "origin", vg)
    settle()
    origin = lv("origin")
    before = {}
    for offset, length in writes:                 # known contents before the snapshot
        before[offset] = os.urandom(length)
        dd_write(origin, before[offset], offset)

    run("lvcreate", "-y", "-s", "-L", "16M", "--chunksize", f"{chunk_kib}k", "-n", "snap", f"{vg}/origin")
    settle()
    # udev made the LV links and the hidden -cow/-real nodes; LVM's live insertion is in the tables.
    for path in (lv("origin"), lv("snap"), f"/dev/mapper/{vg}-snap-cow", f"/dev/mapper/{vg}-origin-real"):
        assert Path(path).is_block_device(), f"{path} missing"
    tables = {line.split(":")[0]: line.split(":", 1)[1].split() for line in out("dmsetup", "table").splitlines()}
    assert tables[f"{vg}-origin"][2] == "snapshot-origin"
    snap_table = tables[f"{vg}-snap"]
    assert snap_table[2] == "snapshot" and snap_table[5:] == ["P", str(chunk_kib * 2)], snap_table

    after = {}
    for offset, length in writes:
        after[offset] = os.urandom(length)
        dd_write(origin, after[offset], offset)

    cow = read_cow(f"/dev/mapper/{vg}-snap-cow")
    assert (cow.magic, cow.valid, cow.version, cow.chunk_sectors) == (SNAP_MAGIC, 1, 1, chunk_kib * 2)
    old_chunks = [old for old, _ in cow.exceptions]
    assert len(old_chunks) == len(set(old_chunks)), "a chunk was copied twice"
    assert set(old_chunks) == expected
    if case == "4k-chunks-two-areas":
        assert cow.areas_read == 2
    per_area = cow.chunk_bytes // 16
    area_chunks = {1 + a * (per_area + 1) for a in range(cow.areas_read)}
    new_chunks = [new for _, new in cow.exceptions]
    assert len(set(new_chunks)) == len(new_chunks) and not area_chunks & set(new_chunks)

    # Each exception's data chunk in the COW device holds that chunk's contents from before the snapshot.
    old_data = {}
    for offset, data in before.items():
        for i in range(0, len(data), 4096):
            old_data[offset + i] = data[i:i + 4096]
    cow_dev = f"/dev/mapper/{vg}-snap-cow"
    for old, new in cow.exceptions:
        copied = read_direct(cow_dev, new * cow.chunk_bytes, cow.chunk_bytes)
        for i in range(0, cow.chunk_bytes, 4096):
            want = old_data.get(old * cow.chunk_bytes + i, bytes(4096))
            assert copied[i:i + 4096] == want, f"COW chunk {new} (origin chunk {old}) +{i}: wrong data"

    # The snapshot still reads the old contents, the origin the new ones.
    for offset, data in before.items():
        assert read_direct(lv("snap"), offset, len(data)) == data
        assert read_direct(origin, offset, len(data)) == after[offset]
    report = json.loads(out("lvs", "--reportformat", "json", "-o", "lv_name,origin,data_percent", vg))
    snap = next(row for row in report["report"][0]["lv"] if row["lv_name"] == "snap")
    assert snap["origin"] == "origin" and float(snap["data_percent"]) > 0
