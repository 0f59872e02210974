"""dm-era on the lab kernel: writes are recorded per era, and era_invalidate reads them from a metadata snapshot.

Table: ``era <metadata dev> <origin dev> <block size>``; status: ``<md block size> <used>/<total> <current era>
<held metadata root|->`` (Documentation/admin-guide/device-mapper/era.rst).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import MiB, dd_write, dm_remove, out, run, settle

CHUNK_SECTORS = 2048                     # 1 MiB era blocks
CHUNK = CHUNK_SECTORS * 512
META_SECTORS = 64 * MiB // 512           # metadata: a 64 MiB linear device at the start of /dev/vdb


@dataclass
class EraStatus:
    metadata_block_size: int
    used: int
    total: int
    current_era: int
    held_root: str                         # "-" when no metadata snapshot is held


@dataclass
class Era:
    name: str
    path: str
    meta: str
    chunks: int

    def status(self) -> EraStatus:
        fields = out("dmsetup", "status", self.name).split()
        assert fields[2] == "era", fields
        used, total = fields[4].split("/")
        return EraStatus(int(fields[3]), int(used), int(total), int(fields[5]), fields[6])

    def message(self, *words: str) -> None:
        run("dmsetup", "message", self.name, "0", *words)

    def write_chunk(self, chunk: int) -> None:
        dd_write(self.path, os.urandom(CHUNK), chunk * CHUNK)


def era_invalidate(meta: str, since: int) -> set[int]:
    """The blocks ``era_invalidate --written-since`` lists from the metadata snapshot, XML parsed."""
    xml = out("era_invalidate", "--written-since", str(since), "--metadata-snapshot", meta)
    root = ET.fromstring(xml)
    assert root.tag == "blocks", xml
    blocks: set[int] = set()
    for el in root:
        if el.tag == "block":
            blocks.add(int(el.get("block")))
        elif el.tag == "range":                # [begin, end)
            blocks.update(range(int(el.get("begin")), int(el.get("end"))))
        else:
            raise AssertionError(f"unexpected element in era_invalidate output: {el.tag}\n{xml}")
    return blocks


@pytest.fixture
def era(clean_disks):
    vda, vdb = clean_disks
    meta_name, name = "lab-era-meta", "lab-era"
    run("dmsetup", "create", meta_name, "--table", f"0 {META_SECTORS} linear {vdb} 0")
    meta = f"/dev/mapper/{meta_name}"
    settle()
    dd_write(meta, bytes(MiB), 0)                # a zeroed superblock: dm-era formats new metadata
    origin_sectors = int(out("blockdev", "--getsz", vda))
    run("dmsetup", "create", name, "--table", f"0 {origin_sectors} era {meta} {vda} {CHUNK_SECTORS}")
    settle()
    dev = Era(name=name, path=f"/dev/mapper/{name}", meta=meta, chunks=origin_sectors // CHUNK_SECTORS)
    yield dev
    if dev.status().held_root != "-":
        dev.message("drop_metadata_snap")
    dm_remove(name)
    dm_remove(meta_name)


def test_era_lists_exactly_the_written_chunk(era):
    # udev made the node (without udev, dmsetup waits and /dev/mapper/NAME never appears).
    node = Path(era.path)
    assert node.is_symlink() and node.resolve().name.startswith("dm-") and node.is_block_device()
    table = out("dmsetup", "table", era.name).split()          # 0 LEN era META_MAJ:MIN ORIGIN_MAJ:MIN 2048
    meta_rdev = os.stat(era.meta).st_rdev
    assert table[2] == "era" and table[5] == str(CHUNK_SECTORS), table
    assert table[3] == f"{os.major(meta_rdev)}:{os.minor(meta_rdev)}", table
    st = era.status()
    assert st.total > 0 and st.held_root == "-"
    first_era = st.current_era

    chunk = 777
    era.write_chunk(chunk)
    era.message("checkpoint")
    after_checkpoint = era.status()
    assert after_checkpoint.current_era > first_era, "checkpoint did not start a new era"

    era.message("take_metadata_snap")
    held = era.status()
    assert held.held_root != "-", "take_metadata_snap holds no metadata root"
    try:
        assert era_invalidate(era.meta, first_era) == {chunk}
        # Nothing was written since the checkpoint.
        assert era_invalidate(era.meta, after_checkpoint.current_era) == set()
    finally:
        era.message("drop_metadata_snap")
    assert era.status().held_root == "-"


def test_era_separates_writes_by_era(era):
    """Writes in era E and E+1: --written-since E lists both, --written-since E+1 only the later one."""
    e1 = era.status().current_era
    era.write_chunk(10)
    era.write_chunk(11)
    era.message("checkpoint")
    e2 = era.status().current_era
    assert e2 > e1
    era.write_chunk(11)                          # written again in the new era
    era.write_chunk(era.chunks - 1)              # the last chunk of the device
    era.message("checkpoint")
    era.message("take_metadata_snap")
    try:
        assert era_invalidate(era.meta, e1) == {10, 11, era.chunks - 1}
        assert era_invalidate(era.meta, e2) == {11, era.chunks - 1}
        # Every block has era >= 0: --written-since 0 is the whole device (one <range> element).
        assert era_invalidate(era.meta, 0) == set(range(era.chunks))
    finally:
        era.message("drop_metadata_snap")


def _era_tools_version() -> str:
    return out("era_invalidate", "-V")


def test_era_invalidate_reads_the_snapshot_not_the_live_metadata(era, request):
    """A write after take_metadata_snap must not show in what era_invalidate reads from the snapshot.

    thin-provisioning-tools 0.9.0 (Debian 12) ignores the snapshot: era::metadata(bm, metadata_snap) calls
    open_metadata(bm) at the live superblock, so blocks written after the snapshot are listed too, and the
    tool reads a tree the kernel is changing. Marked as an expected failure for 0.x (strict: a fixed
    version makes this test fail until the mark is removed).
    """
    version = _era_tools_version()
    if re.match(r"0\.", version):
        request.applymarker(pytest.mark.xfail(
            strict=True, reason=f"thin-provisioning-tools {version}: era_invalidate --metadata-snapshot "
                                "reads the live superblock, not the held snapshot"))
    e1 = era.status().current_era
    era.write_chunk(5)
    era.message("checkpoint")
    era.message("take_metadata_snap")
    try:
        era.write_chunk(1500)                    # after the snapshot: recorded in the live metadata only
        era.message("checkpoint")
        assert era_invalidate(era.meta, e1) == {5}
    finally:
        era.message("drop_metadata_snap")
