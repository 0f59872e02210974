"""The Export under the NBD server: O_DIRECT and buffered paths, zeroing, trimming, allocation, and
dirty marking on every path that changes bytes, on an image file and on a loop device."""

from __future__ import annotations

import errno
import os

import pytest

from blocktrack.errors import DeviceError, UsageError
from blocktrack.nbd.export import BufferPool, Export
from blocktrack.nbd.protocol import NBD_STATE_HOLE, NBD_STATE_ZERO
from tests.conftest import MiB, blank_image, write_image

SIZE = 8 * MiB


@pytest.fixture(params=["file", "loop"])
def served(request, tmp_path, loop_device):
    image = write_image(tmp_path / "disk.img", SIZE, seed=4)
    path = image if request.param == "file" else loop_device(image)
    export = Export(path)
    yield export, image
    export.close()


def _read(export, offset, length, buf=None):
    buf = buf if buf is not None else bytearray(length)
    export.read_into(memoryview(buf)[:length], offset)
    return bytes(buf[:length])


def test_direct_io_is_used_and_aligned(served):
    export, _ = served
    assert export.direct and export.align == 512
    assert export.size == SIZE and export.dirty.nchunks == 8


@pytest.mark.parametrize("offset, length", [(0, 4096), (MiB, MiB), (4096 * 3 + 1, 1000), (511, 2),
                                            (SIZE - 4096, 4096), (SIZE - 1, 1)])
def test_write_then_read_any_alignment(served, offset, length):
    export, image = served
    pool = BufferPool()
    data = os.urandom(length)
    buf = pool.get(length)                      # page-aligned: the O_DIRECT path when aligned
    buf[:length] = data
    export.write_from(memoryview(buf)[:length], offset)
    export.flush()
    assert _read(export, offset, length, pool.get(length)) == data
    assert image.read_bytes()[offset:offset + length] == data
    first, last = offset // MiB, (offset + length - 1) // MiB
    assert list(export.dirty) == list(range(first, last + 1))


def test_unaligned_buffer_falls_back_to_the_page_cache(served):
    export, image = served
    backing = bytearray(8192 + 1)
    view = memoryview(backing)[1:4097]          # an odd address: O_DIRECT refuses it with EINVAL
    view[:] = b"\x7e" * 4096
    export.write_from(view, 4096, fua=True)
    assert image.read_bytes()[4096:8192] == b"\x7e" * 4096
    out = memoryview(bytearray(8192 + 1))[1:4097]
    export.read_into(out, 4096)
    assert bytes(out) == b"\x7e" * 4096


def test_write_zeroes_trim_and_their_marks(served):
    export, image = served
    export.write_zeroes(MiB + 100, 5000)                          # unaligned edges
    export.write_zeroes(2 * MiB, MiB, may_trim=False, fua=True)   # NO_HOLE
    export.trim(4 * MiB, MiB)
    data = image.read_bytes()
    assert data[MiB + 100:MiB + 5100] == bytes(5000)
    assert data[2 * MiB:3 * MiB] == bytes(MiB)
    assert data[MiB + 99] != 0 or data[MiB + 5100] != 0           # neighbours untouched (random data)
    assert sorted(export.dirty) == [1, 2, 4]


def test_fast_zero(served, tmp_path):
    export, image = served
    export.write_zeroes(3 * MiB, MiB, fast=True)                 # whole sectors: fallocate does it
    assert image.read_bytes()[3 * MiB:4 * MiB] == bytes(MiB)
    assert list(export.dirty) == [3]
    if export.is_block_device:
        # Not sector-aligned on a block device: refused at once, nothing changed, nothing marked.
        before = image.read_bytes()
        with pytest.raises(OSError) as caught:
            export.write_zeroes(5 * MiB + 1, 100, fast=True)
        assert caught.value.errno == errno.ENOTSUP
        assert image.read_bytes() == before and list(export.dirty) == [3]


def test_allocation_reports_holes_of_files_and_data_of_devices(tmp_path, loop_device):
    image = blank_image(tmp_path / "sparse.img", 4 * MiB)
    with open(image, "r+b") as f:
        f.seek(MiB)
        f.write(b"\x01" * MiB)
    export = Export(image)
    holes = NBD_STATE_HOLE | NBD_STATE_ZERO
    assert export.allocation(0, 4 * MiB, 100) == [(MiB, holes), (MiB, 0), (2 * MiB, holes)]
    assert export.allocation(MiB + 10, 3 * MiB, 100) == [(MiB - 10, 0), (MiB, holes)]
    assert export.allocation(0, 4 * MiB, 2) == [(MiB, holes), (MiB, 0)]   # limited: the client asks again
    export.close()
    device = Export(loop_device(image))
    assert device.allocation(0, 4 * MiB, 100) == [(4 * MiB, 0)]
    device.close()


def test_read_past_a_shrunken_file_is_eio(tmp_path):
    image = write_image(tmp_path / "disk.img", 2 * MiB)
    export = Export(image)
    os.truncate(image, MiB)
    with pytest.raises(OSError) as caught:
        _read(export, MiB - 512, 4096)
    assert caught.value.errno == errno.EIO
    export.close()


def test_buffered_mode_and_read_only(tmp_path):
    image = write_image(tmp_path / "disk.img", MiB)
    export = Export(image, direct=False, read_only=True)
    assert not export.direct and export.align == 1 and export.read_only
    assert _read(export, 0, 100) == image.read_bytes()[:100]
    with pytest.raises(OSError) as caught:
        export.write_from(memoryview(b"x" * 512), 0)
    assert caught.value.errno == errno.EBADF
    export.close()


def test_block_devices_are_opened_exclusively(tmp_path, loop_device):
    device = loop_device(write_image(tmp_path / "disk.img", MiB))
    first = Export(device)
    with pytest.raises(DeviceError, match="in use"):
        Export(device)
    Export(device, read_only=True).close()       # reading beside it is allowed
    first.close()
    Export(device).close()


def test_open_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        Export(tmp_path / "missing")
    with pytest.raises(UsageError, match="neither a block device"):
        Export(tmp_path)


def test_buffer_pool_reuses_and_bounds():
    pool = BufferPool(keep_bytes=3 * 4096)
    a, b = pool.get(100), pool.get(4096)
    assert len(a) == len(b) == 4096
    pool.put(a)
    assert pool.get(10) is a
    big = pool.get(5000)
    assert len(big) == 8192
    for buf in (b, big, pool.get(1), pool.get(1)):
        pool.put(buf)
    assert pool._kept <= 3 * 4096
    pool.clear()


def test_buffer_pool_never_closes_a_buffer_that_a_view_still_refers_to():
    """Issue 17, defect 1: a buffer the pool does not keep is dropped, not closed: closing it
    while a view (a reply being sent) still refers to it raised BufferError in the worker."""
    pool = BufferPool(keep_bytes=0)
    buf = pool.get(4096)
    buf[:5] = b"reply"
    view = memoryview(buf)[:5]
    pool.put(buf)                                   # not kept: over keep_bytes
    assert bytes(view) == b"reply"                  # the mapping is still there for the view
    view.release()


def test_buffer_pool_keeps_lent_and_kept_buffers_within_its_limit():
    pool = BufferPool(keep_bytes=1 << 20, limit_bytes=64 * 1024)
    lent = [pool.get(16 * 1024) for _ in range(3)]
    assert pool.lent_bytes == 48 * 1024
    for buf in lent:
        pool.put(buf)
    assert pool.lent_bytes == 0 and pool.kept_bytes == 48 * 1024
    big = pool.get(32 * 1024)                       # a new size: kept buffers make room for it
    assert pool.lent_bytes + pool.kept_bytes <= 64 * 1024
    again = pool.get(16 * 1024)                     # one of the kept ones, if any is left
    assert pool.lent_bytes + pool.kept_bytes <= 64 * 1024
    for buf in (big, again):
        pool.put(buf)
    assert pool.lent_bytes == 0 and pool.kept_bytes <= 64 * 1024
    pool.clear()
    assert pool.kept_bytes == 0
