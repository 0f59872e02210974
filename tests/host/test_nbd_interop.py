"""`blocktrack serve` against real NBD clients: nbdinfo, qemu-io, qemu-img, nbdcopy, fio.

Every test runs twice: serving an image file, and serving a loop device (direct I/O on) over such
a file. Data is always checked against the backing file read directly, and the dirty map against
the exact chunks the test wrote.
"""

from __future__ import annotations

import filecmp
import json
import shutil

import pytest

from tests.conftest import MiB, write_image
from tests.host.nbd_helpers import Served, dirty_chunks, dirty_map, run_tool

SIZE = 64 * MiB + 64 * 1024     # not a whole number of 1 MiB chunks: the last chunk is short
ZEROED = [(8 * MiB, 4 * MiB)]   # a hole punched in the image file


@pytest.fixture(params=["file", "loop"])
def target(request, tmp_path, loop_device):
    """(path served, backing file): the image itself, or a loop device over it."""
    image = write_image(tmp_path / "disk.img", SIZE, seed=7)
    _punch(image, *ZEROED[0])
    if request.param == "file":
        return image, image
    return loop_device(image), image


def _punch(path, offset, length):
    from blocktrack.nbd.export import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

    with open(path, "r+b") as f:
        fallocate(f.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


@pytest.fixture
def served(target, tmp_path):
    path, _backing = target
    with Served(path, tmp_path / "nbd.sock") as server:
        yield server
    assert server.returncode == 0, server.stderr


def _backing_bytes(target) -> bytes:
    return target[1].read_bytes()


def test_nbdinfo_list_shows_export_and_contexts(served, target):
    out = json.loads(run_tool("nbdinfo", "--json", "--list", served.uri).stdout)
    assert out["protocol"] == "newstyle-fixed" and out["structured"] is True
    (export,) = out["exports"]
    assert export["export-name"] == ""
    assert export["export-size"] == SIZE
    assert set(export["contexts"]) == {"base:allocation", "qemu:dirty-bitmap:blocktrack"}
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn", "can_df"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert export["block_size_maximum"] == 32 * MiB


def test_nbdinfo_map_base_allocation(served, target):
    extents = json.loads(run_tool("nbdinfo", "--json", "--map", served.uri).stdout)
    assert sum(e["length"] for e in extents) == SIZE
    assert extents[0]["offset"] == 0
    for a, b in zip(extents, extents[1:]):
        assert a["offset"] + a["length"] == b["offset"]
    if target[0] == target[1]:
        # The image file's punched range is reported as a hole that reads as zeroes.
        hole_offset, hole_length = ZEROED[0]
        holes = [e for e in extents if e["type"] == 3]
        assert any(e["offset"] <= hole_offset and e["offset"] + e["length"] >= hole_offset + hole_length
                   for e in holes), extents
        assert all(e["type"] in (0, 3) for e in extents)
    else:
        # A block device: everything is reported as allocated data.
        assert [e["type"] for e in extents] == [0]


def test_dirty_bitmap_shows_exactly_the_chunks_written_with_qemu_io(served, target):
    assert dirty_chunks(served.uri) == []
    writes = [(0, 4096), (5 * MiB + 512, 1000), (20 * MiB - 4096, 8192), (40 * MiB, 3 * MiB),
              (SIZE - 4096, 4096)]
    commands = []
    for offset, length in writes:
        commands += ["-c", f"write -P 0xab {offset} {length}"]
    run_tool("qemu-io", "-f", "raw", *commands, served.uri)
    expected = set()
    for offset, length in writes:
        expected.update(range(offset // MiB, (offset + length - 1) // MiB + 1))
    assert dirty_chunks(served.uri) == sorted(expected)
    # The extents cover the export exactly, the short last chunk included.
    extents = dirty_map(served.uri)
    assert extents[-1]["offset"] + extents[-1]["length"] == SIZE
    # What qemu-io wrote is in the backing file.
    data = _backing_bytes(target)
    for offset, length in writes:
        assert data[offset:offset + length] == b"\xab" * length
    # Reads do not dirty anything.
    run_tool("qemu-io", "-f", "raw", "-r", "-c", f"read 0 {SIZE}", served.uri)
    assert dirty_chunks(served.uri) == sorted(expected)


def test_qemu_reads_the_dirty_bitmap_too(served):
    """QEMU's own NBD client can read the context (its x-dirty-bitmap option reports dirty extents
    as "data": false in `qemu-img map`)."""
    run_tool("qemu-io", "-f", "raw", "-c", f"write -P 1 {3 * MiB + 4096} 4096", "-c", "write 30M 2M", served.uri)
    opts = f"driver=nbd,server.type=unix,server.path={served.socket},x-dirty-bitmap=qemu:dirty-bitmap:blocktrack"
    extents = json.loads(run_tool("qemu-img", "map", "--output=json", "--image-opts", opts).stdout)
    dirty = [(e["start"], e["length"]) for e in extents if not e["data"]]
    assert dirty == [(3 * MiB, MiB), (30 * MiB, 2 * MiB)]


def test_qemu_img_info_convert_compare(served, target, tmp_path):
    info = json.loads(run_tool("qemu-img", "info", "--output=json", served.uri).stdout)
    assert info["virtual-size"] == SIZE and info["format"] == "raw"
    copy = tmp_path / "copy.img"
    run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, copy)
    assert copy.read_bytes() == _backing_bytes(target)
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", copy, served.uri)
    # And the other way: convert into the export (qemu-img writes zeroes and data), then compare.
    source = write_image(tmp_path / "source.img", SIZE, seed=99, zero_ranges=[(MiB, 3 * MiB)])
    run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, served.uri)
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", source, served.uri)
    assert _backing_bytes(target) == source.read_bytes()
    assert dirty_chunks(served.uri) == list(range(-(-SIZE // MiB)))


def test_nbdcopy_both_ways(served, target, tmp_path):
    out = tmp_path / "out.img"
    run_tool("nbdcopy", served.uri, out)
    assert out.read_bytes() == _backing_bytes(target)
    source = write_image(tmp_path / "source.img", SIZE, seed=3, zero_ranges=[(2 * MiB, 2 * MiB)])
    run_tool("nbdcopy", "--flush", source, served.uri)
    assert _backing_bytes(target) == source.read_bytes()
    back = tmp_path / "back.img"
    run_tool("nbdcopy", served.uri, back)
    assert filecmp.cmp(back, source, shallow=False)


@pytest.mark.parametrize("rw", ["randwrite", "write"])
def test_fio_nbd_engine_several_jobs_matches_a_direct_run(served, target, tmp_path, rw):
    """fio through NBD with 4 jobs: first a write-and-verify run (fio reads every block back and
    checks it), then a deterministic write (fixed seed, each job in its own 16 MiB region, no
    time stamps in the data) both through NBD and on a plain copy of the image with psync: the two
    results are byte-for-byte identical."""
    jobs, region = 4, 16 * MiB
    common = ["--rw", rw, "--bs", "64k" if rw == "write" else "4k", "--numjobs", str(jobs),
              "--size", str(region), "--offset_increment", str(region), "--randseed", "1234",
              "--group_reporting", "--output-format", "json"]
    report = tmp_path / "fio.json"  # fio's nbd engine prints to stdout too: JSON goes to a file
    # (--verify_state_save=0: fio would otherwise leave *-verify.state files in the working directory.)
    run_tool("fio", "--name", "verify", "--ioengine", "nbd", "--uri", served.uri, "--iodepth", "16",
             "--verify", "crc32c", "--verify_state_save", "0", "--output", report, *common, cwd=tmp_path)
    job = json.loads(report.read_text())["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == jobs * region
    assert job["read"]["io_bytes"] == jobs * region  # the verification pass read it all back

    reference = tmp_path / "reference.img"
    shutil.copyfile(target[1], reference)
    deterministic = ["--refill_buffers", "--scramble_buffers", "0", *common]
    run_tool("fio", "--name", "copy", "--ioengine", "nbd", "--uri", served.uri, "--iodepth", "16", *deterministic,
             cwd=tmp_path)
    # (--iodepth changes how fio fills its buffers, so the direct run uses the same one.)
    run_tool("fio", "--name", "copy", "--ioengine", "psync", "--filename", reference, "--iodepth", "16",
             *deterministic, cwd=tmp_path)
    assert _backing_bytes(target) == reference.read_bytes()
    assert dirty_chunks(served.uri) == list(range(jobs * region // MiB))


def test_many_sequential_and_concurrent_clients(served, target):
    import subprocess

    for i in range(5):
        run_tool("qemu-io", "-f", "raw", "-c", f"write -P {i + 1} {i * MiB} 4096", served.uri)
    readers = [subprocess.Popen(["nbdcopy", served.uri, "null:"], stderr=subprocess.PIPE) for _ in range(6)]
    for proc in readers:
        assert proc.wait(300) == 0, proc.stderr.read()
        proc.stderr.close()
    assert dirty_chunks(served.uri) == [0, 1, 2, 3, 4]
    data = _backing_bytes(target)
    for i in range(5):
        assert data[i * MiB:i * MiB + 4096] == bytes([i + 1]) * 4096
