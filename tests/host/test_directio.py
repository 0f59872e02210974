"""ChunkReader / ChunkWriter on real files and loop devices (O_DIRECT), the buffered fallback, and
the error cases: a device that shrinks under the reader, failed writes, read-only and missing
targets. Needs root (loop devices, mounts); runs on the host, never skipped."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import random
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xxhash

from blocktrack.directio import CHUNK_SIZE, ChunkReader, ChunkWriter, digest128, is_zero
from blocktrack.migrate.verify import DigestMap
from blocktrack.errors import DeviceError, IOFailure
from blocktrack.kernel import blockdev
from tests.conftest import MiB, blank_image, write_image

pytestmark = pytest.mark.root

ODD_DEVICE = 24 * MiB + 4096    # loop device: not a whole number of chunks
ODD_FILE = 3 * MiB + 512        # file: a one-sector tail chunk
RAGGED_FILE = 3 * MiB + 100     # file: a tail that is not even a whole sector


# -- fixtures ------------------------------------------------------------------------------------


def _direct_read_works(directory: Path) -> bool:
    probe = directory / ".odirect-probe"
    probe.write_bytes(b"\1" * 8192)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [mmap.mmap(-1, 4096)], 0) == 4096  # page-aligned buffer
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture
def direct_dir(tmp_path) -> Path:
    """A directory where O_DIRECT works (pytest's tmp_path on this host's ext4)."""
    if not _direct_read_works(tmp_path):
        pytest.fail(f"O_DIRECT does not work in {tmp_path}; run the tests with a tmp dir on ext4/xfs")
    return tmp_path


@contextmanager
def _mounted(fstype: str, where: Path, options: str | None = None):
    where.mkdir()
    cmd = ["mount", "-t", fstype, "none", str(where)]
    if options:
        cmd[3:3] = ["-o", options]
    subprocess.run(cmd, check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.fixture
def no_direct_dir(tmp_path):
    """A ramfs mount: it refuses O_DIRECT at open (EINVAL). tmpfs accepts O_DIRECT since Linux 6.6,
    so /dev/shm only exercises the fallback on older kernels such as the lab's 6.1."""
    with _mounted("ramfs", tmp_path / "ramfs") as where:
        probe = where / "probe"
        probe.write_bytes(b"x")
        with pytest.raises(OSError) as info:
            os.open(probe, os.O_RDONLY | os.O_DIRECT)
        assert info.value.errno == errno.EINVAL
        yield where


@pytest.fixture
def losetup():
    """Attach a file as a loop device (extra losetup options allowed); detach at teardown."""
    attached: list[str] = []

    def attach(path: Path, *options: str) -> str:
        dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", *options, str(path)],
                             check=True, capture_output=True, text=True).stdout.strip()
        attached.append(dev)
        name = os.path.basename(dev)
        assert Path(f"/sys/block/{name}/loop/dio").read_text().strip() == "1", "loop direct I/O is off"
        return dev

    yield attach
    for dev in reversed(attached):
        subprocess.run(["losetup", "--detach", dev], check=False)


def _read_all(reader: ChunkReader, order=None) -> bytes:
    """Read chunks in ``order`` (default: all, ascending); check they come back in that order and
    that a chunk read twice reads the same; return the device's bytes."""
    order = list(range(reader.nchunks)) if order is None else order
    got = [(index, bytes(view)) for index, view in reader.read(order)]
    assert [index for index, _ in got] == order
    pieces = {}
    for index, data in got:
        assert pieces.setdefault(index, data) == data
    return b"".join(pieces[i] for i in sorted(pieces))


def _write_all(writer: ChunkWriter, data: bytes, order) -> None:
    for index in order:
        offset = index * writer.chunk_size
        length = min(writer.chunk_size, len(data) - offset)
        token, buf = writer.buffer()
        assert len(buf) == writer.chunk_size
        buf[:length] = data[offset:offset + length]
        writer.submit(token, offset, length)


def _cmp(a, b) -> None:
    result = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [ODD_FILE, RAGGED_FILE, 2 * MiB, 4096, 100, 0])
@pytest.mark.parametrize("depth", [1, 3, 8])
def test_reader_returns_the_file_bytes(direct_dir, size, depth):
    path = write_image(direct_dir / "src.img", size, seed=size + depth)
    data = path.read_bytes()
    with ChunkReader(str(path), depth=depth) as reader:
        assert reader.direct is True
        assert (reader.size, reader.nchunks, reader.chunk_size) == (size, -(-size // MiB), MiB)
        assert _read_all(reader) == data
        order = list(range(reader.nchunks))
        random.Random(size).shuffle(order)
        assert _read_all(reader, order + order[:2]) == data  # any order, repeats allowed
        for i in range(reader.nchunks):
            assert reader.read_one(i) == data[i * MiB:(i + 1) * MiB]


def test_reader_on_a_loop_device(direct_dir, losetup):
    path = write_image(direct_dir / "disk.img", ODD_DEVICE, seed=7, zero_ranges=[(2 * MiB, MiB)])
    dev = losetup(path)
    with ChunkReader(dev) as reader:
        assert reader.direct and reader.size == ODD_DEVICE and reader.nchunks == 25
        assert reader.sector_size == 512
        got = b""
        for index, view in reader.read(range(reader.nchunks)):
            assert len(view) == (4096 if index == 24 else MiB)
            assert is_zero(view) == (index == 2)
            got += view
        assert got == path.read_bytes()


def test_reader_small_chunks_and_4k_sectors(direct_dir, losetup):
    path = write_image(direct_dir / "disk4k.img", 8 * MiB + 8192, seed=9)
    dev = losetup(path, "--sector-size", "4096")
    with ChunkReader(dev, chunk_size=64 * 1024, depth=5) as reader:
        assert reader.sector_size == 4096 and reader.direct
        assert _read_all(reader) == path.read_bytes()
    with pytest.raises(DeviceError, match="4096-byte sectors"):
        ChunkReader(dev, chunk_size=512)


def test_reader_falls_back_where_o_direct_is_refused(no_direct_dir):
    path = write_image(no_direct_dir / "src.img", ODD_FILE, seed=3)
    with ChunkReader(str(path)) as reader:
        assert reader.direct is False
        assert _read_all(reader) == path.read_bytes()


def test_reader_on_dev_shm(tmp_path):
    path = write_image(Path("/dev/shm") / f"bt-test-{os.getpid()}.img", RAGGED_FILE, seed=4)
    try:
        with ChunkReader(str(path)) as reader:  # direct on kernels >= 6.6, buffered before
            assert _read_all(reader) == path.read_bytes()
    finally:
        path.unlink()


def test_reader_buffered_when_asked(direct_dir):
    path = write_image(direct_dir / "src.img", ODD_FILE, seed=5)
    with ChunkReader(str(path), direct=False) as reader:
        assert reader.direct is False
        assert _read_all(reader) == path.read_bytes()


def test_view_is_released_when_the_generator_moves_on(direct_dir):
    path = write_image(direct_dir / "src.img", 3 * MiB, seed=6)
    with ChunkReader(str(path)) as reader:
        gen = reader.read(range(3))
        _, first = next(gen)
        next(gen)
        with pytest.raises(ValueError):
            bytes(first)  # released: a stale view fails loudly instead of showing recycled bytes
        gen.close()


def test_closing_the_generator_early_returns_every_buffer(direct_dir):
    path = write_image(direct_dir / "src.img", 20 * MiB, seed=8)
    data = path.read_bytes()
    with ChunkReader(str(path), depth=4) as reader:
        for stop in (0, 1, 2, 7):
            gen = reader.read(range(reader.nchunks))
            for _ in range(stop):
                next(gen)
            gen.close()
            assert reader._engine.outstanding == 0
        for index, _view in reader.read(range(reader.nchunks)):
            if index == 3:
                break  # a for loop that breaks drops the generator: CPython closes it at once
        with pytest.raises(RuntimeError, match="consumer"):
            for index, _view in reader.read(range(reader.nchunks)):
                if index == 5:
                    raise RuntimeError("consumer failed")
        assert reader._engine.outstanding == 0
        assert _read_all(reader) == data  # all buffers came back


def test_one_read_at_a_time_but_read_one_is_fine(direct_dir):
    path = write_image(direct_dir / "src.img", 4 * MiB, seed=10)
    data = path.read_bytes()
    with ChunkReader(str(path)) as reader:
        gen = reader.read(range(4))
        next(gen)
        with pytest.raises(RuntimeError, match="already running"):
            next(reader.read(range(4)))
        assert reader.read_one(3) == data[3 * MiB:]
        gen.close()


def test_close_with_a_suspended_generator(direct_dir):
    path = write_image(direct_dir / "src.img", 10 * MiB, seed=11)
    reader = ChunkReader(str(path))
    gen = reader.read(range(reader.nchunks))
    _, view = next(gen)
    reader.close()
    reader.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        next(gen)
    with pytest.raises(ValueError, match="closed"):
        reader.read_one(0)


def test_bad_chunk_index(direct_dir):
    path = write_image(direct_dir / "src.img", 2 * MiB, seed=12)
    with ChunkReader(str(path)) as reader:
        with pytest.raises(IndexError):
            list(reader.read([0, 2]))
        with pytest.raises(IndexError):
            reader.read_one(-1)
        assert _read_all(reader) == path.read_bytes()


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


@contextmanager
def _stuck_page():
    """A page whose first touch blocks in the kernel until we let go: a read into it behaves like
    a read from a device that stopped answering. (userfaultfd, missing-page mode; closing the uffd
    releases the blocked fault.) Yields (address, release)."""
    from ioctl_opt import IOWR

    libc = ctypes.CDLL(None, use_errno=True)
    uffd = libc.syscall(323, os.O_CLOEXEC)  # SYS_userfaultfd on x86-64
    assert uffd >= 0, os.strerror(ctypes.get_errno())
    page = mmap.mmap(-1, 4096)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    open_fds = [uffd]

    def release():
        while open_fds:
            os.close(open_fds.pop())

    try:
        fcntl.ioctl(uffd, IOWR(0xAA, 0x3F, _UffdioApi), _UffdioApi(0xAA, 0, 0))
        fcntl.ioctl(uffd, IOWR(0xAA, 0x00, _UffdioRegister), _UffdioRegister(address, 4096, 1, 0))
        yield address, release
    finally:
        release()


def test_waiting_for_a_stuck_request_stays_interruptible(direct_dir):
    """A device that stops answering must not make Ctrl-C wait for it: the engine waits in C in
    slices, so a Python signal handler runs meanwhile. The stuck request is a read into a page that
    userfaultfd holds."""
    from blocktrack._native import ffi, lib
    from blocktrack.directio import _Engine, _Pool

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    path = write_image(direct_dir / "src.img", 4096, seed=16)
    fd = os.open(path, os.O_RDONLY)
    pool = _Pool(4096, 1)
    engine = _Engine(1, 1, pool)
    old = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        with _stuck_page() as (address, release):
            engine.submit(fd, lib.BT_OP_READ, ffi.cast("void *", address), 4096, 0, 7, str(path))
            timer.start()
            started = time.monotonic()
            with pytest.raises(Interrupted):
                engine.reap(1)
            assert time.monotonic() - started < 2
            assert engine.outstanding == 1
            release()  # the "device" answers again
            assert engine.drain() == [(7, 4096)]
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, old)
        engine.destroy()
        os.close(fd)


# -- read errors ---------------------------------------------------------------------------------


def test_file_truncated_under_the_reader(direct_dir):
    path = write_image(direct_dir / "src.img", 8 * MiB, seed=13)
    with ChunkReader(str(path)) as reader:
        os.truncate(path, 5 * MiB + 512)
        got = []
        with pytest.raises(IOFailure) as info:
            for index, view in reader.read(range(reader.nchunks)):
                got.append(index)
        assert got == [0, 1, 2, 3, 4]
        err = info.value
        assert (err.errno, err.path, err.offset) == (errno.EIO, str(path), 5 * MiB)
        assert "short read" in str(err) and str(path) in str(err) and f"byte {5 * MiB}" in str(err)


def test_loop_device_shrunk_to_nothing_under_the_reader(direct_dir, losetup):
    path = write_image(direct_dir / "disk.img", ODD_DEVICE, seed=14)
    dev = losetup(path)
    with ChunkReader(dev) as reader:
        gen = reader.read(range(reader.nchunks))
        next(gen)
        # The device "goes away": its backing store is cut to 4 MiB, then to nothing.
        os.truncate(path, 4 * MiB)
        subprocess.run(["losetup", "--set-capacity", dev], check=True)
        delivered = [0]
        with pytest.raises(IOFailure) as info:
            for index, _view in gen:
                delivered.append(index)
        # Reads already in flight may have finished before the cut, or fail with the kernel's EIO
        # (a loop request that raced the truncate), or come back short (EIO from us): whichever,
        # the error names the first chunk that was not delivered, and nothing past the cut was.
        assert delivered == list(range(len(delivered))) and len(delivered) < 24
        assert info.value.path == dev and info.value.errno == errno.EIO
        assert info.value.offset == len(delivered) * MiB >= 4 * MiB
        os.truncate(path, 0)
        subprocess.run(["losetup", "--set-capacity", dev], check=True)
        with pytest.raises(IOFailure) as info:
            reader.read_one(0)
        assert (info.value.path, info.value.offset, info.value.errno) == (dev, 0, errno.EIO)


def test_read_errno_reaches_the_caller(direct_dir):
    """A read the kernel refuses (here EBADF: the descriptor is swapped for a write-only one behind
    the reader's back) surfaces as IOFailure with that errno, the path and the chunk's offset."""
    path = write_image(direct_dir / "src.img", 3 * MiB, seed=15)
    with ChunkReader(str(path)) as reader:
        wfd = os.open(path, os.O_WRONLY)
        os.dup2(wfd, reader._fd)
        os.close(wfd)
        with pytest.raises(IOFailure) as info:
            list(reader.read([2, 0]))
        assert (info.value.errno, info.value.path, info.value.offset) == (errno.EBADF, str(path), 2 * MiB)


def test_reader_open_errors(tmp_path):
    with pytest.raises(IOFailure) as info:
        ChunkReader(str(tmp_path / "missing.img"))
    assert info.value.errno == errno.ENOENT and "missing.img" in str(info.value)
    with pytest.raises(DeviceError, match="neither a block device nor a regular file"):
        ChunkReader(str(tmp_path))


# -- writing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [ODD_FILE, RAGGED_FILE, 2 * MiB, 100])
@pytest.mark.parametrize("depth", [1, 8])
def test_writer_writes_the_bytes_back(direct_dir, size, depth):
    src = write_image(direct_dir / "src.img", size, seed=size)
    dst = write_image(direct_dir / "dst.img", size, seed=size + 1)  # stale contents to overwrite
    data = src.read_bytes()
    order = list(range(-(-size // MiB)))
    random.Random(depth).shuffle(order)
    with ChunkWriter(str(dst), depth=depth) as writer:
        assert writer.direct is True and writer.size == size
        _write_all(writer, data, order)
    _cmp(src, dst)


def test_copy_loop_device_to_loop_device(direct_dir, losetup):
    src = write_image(direct_dir / "src.img", ODD_DEVICE, seed=20, zero_ranges=[(5 * MiB, 3 * MiB)])
    dst = write_image(direct_dir / "dst.img", ODD_DEVICE, seed=21)
    src_dev, dst_dev = losetup(src), losetup(dst)
    with ChunkReader(src_dev) as reader, ChunkWriter(dst_dev) as writer:
        assert writer.direct and writer.size == ODD_DEVICE
        for index, view in reader.read(range(reader.nchunks)):
            offset = index * MiB
            if is_zero(view):
                writer.write_zeroes(offset, len(view))
            else:
                token, buf = writer.buffer()
                buf[:len(view)] = view
                writer.submit(token, offset, len(view))
    _cmp(src_dev, dst_dev)
    _cmp(src, dst)


def test_writer_falls_back_where_o_direct_is_refused(no_direct_dir):
    src = write_image(no_direct_dir / "src.img", RAGGED_FILE, seed=22)
    dst = write_image(no_direct_dir / "dst.img", RAGGED_FILE, seed=23)
    with ChunkWriter(str(dst)) as writer:
        assert writer.direct is False
        _write_all(writer, src.read_bytes(), [3, 1, 0, 2])
    _cmp(src, dst)


def test_writer_on_dev_shm():
    base = Path("/dev/shm") / f"bt-test-{os.getpid()}"
    src = write_image(base.with_suffix(".src"), RAGGED_FILE, seed=24)
    dst = blank_image(base.with_suffix(".dst"), RAGGED_FILE)
    try:
        with ChunkWriter(str(dst)) as writer:
            _write_all(writer, src.read_bytes(), range(4))
        _cmp(src, dst)
    finally:
        src.unlink()
        dst.unlink()


def test_write_zeroes(direct_dir):
    size = RAGGED_FILE
    dst = write_image(direct_dir / "dst.img", size, seed=25)
    expect = bytearray(dst.read_bytes())
    with ChunkWriter(str(dst), depth=3) as writer:
        writer.write_zeroes(512, 2 * MiB + 1024)                # spans chunks, sector aligned
        writer.write_zeroes(3 * MiB - 4096, size - (3 * MiB - 4096))  # to the ragged end
        writer.write_zeroes(0, 0)
    expect[512:512 + 2 * MiB + 1024] = bytes(2 * MiB + 1024)
    expect[3 * MiB - 4096:] = bytes(size - (3 * MiB - 4096))
    assert dst.read_bytes() == bytes(expect)


def test_last_write_to_a_chunk_wins(direct_dir):
    """Rewrites of the same chunk (bulk pass, then dirty passes) are in flight together; the one
    submitted last must be what stays on disk."""
    nchunks = 4
    dst = blank_image(direct_dir / "dst.img", nchunks * MiB)
    rng = random.Random(26)
    final = {}
    with ChunkWriter(str(dst), depth=8) as writer:
        for round_ in range(40):
            index = rng.randrange(nchunks)
            if round_ % 7 == 3:
                writer.write_zeroes(index * MiB, MiB)
                final[index] = bytes(MiB)
                continue
            payload = rng.randbytes(64) * (MiB // 64)
            token, buf = writer.buffer()
            buf[:] = payload
            writer.submit(token, index * MiB, MiB)
            final[index] = payload
    data = dst.read_bytes()
    for index, payload in final.items():
        assert data[index * MiB:(index + 1) * MiB] == payload, f"chunk {index}"


# -- digests (the migration's digest map) --------------------------------------------------------


@pytest.mark.parametrize("size", [ODD_FILE, RAGGED_FILE, 100])
def test_digests_of_reads_and_writes_are_xxh3_128_of_the_bytes(direct_dir, size):
    """The I/O threads' digests equal python-xxhash's XXH3-128 (canonical form) of the chunk's bytes:
    whole chunks, a one-sector tail, a tail of 100 bytes (written synchronously, hashed there), a
    digest size smaller than the file (a migration's device on a larger target)."""
    data = write_image(direct_dir / "src.img", size, seed=40).read_bytes()
    nchunks = -(-size // MiB)
    expect = [xxhash.xxh3_128_digest(data[i * MiB:(i + 1) * MiB]) for i in range(nchunks)]
    assert digest128(data[:MiB]) == expect[0]
    with ChunkReader(str(direct_dir / "src.img"), depth=2) as reader:
        assert [d for _i, _v, d in reader.read_digested(range(nchunks))] == expect
        limit = size - 77
        got = dict((i, d) for i, _v, d in reader.read_digested(range(nchunks), limit))
        assert got == {i: xxhash.xxh3_128_digest(data[i * MiB:min((i + 1) * MiB, limit)]) for i in range(nchunks)}
    dst = write_image(direct_dir / "dst.img", size, seed=41)
    digests = DigestMap(nchunks, MiB, size)
    order = list(range(nchunks))[::-1]
    with ChunkWriter(str(dst), depth=2) as writer:
        for index in order:
            token, buf = writer.buffer()
            length = min(MiB, size - index * MiB)
            buf[:length] = data[index * MiB:index * MiB + length]
            writer.submit(token, index * MiB, length, digest_into=digests.slot(index))
        writer.flush()
    assert [digests.get(i) for i in range(nchunks)] == expect and digests.missing() == []
    assert dst.read_bytes() == data


def test_digest_of_a_rewritten_chunk_is_the_last_write(direct_dir):
    """A chunk written, zeroed and written again with writes in flight: its digest is the last one's."""
    dst = blank_image(direct_dir / "dst.img", 4 * MiB)
    digests = DigestMap(4, MiB, 4 * MiB)
    rng = random.Random(42)
    final = {}
    with ChunkWriter(str(dst), depth=8) as writer:
        for round_ in range(40):
            index = rng.randrange(4)
            if round_ % 5 == 2:
                writer.write_zeroes(index * MiB, MiB)
                digests.set_zero(index)
                final[index] = bytes(MiB)
                continue
            payload = rng.randbytes(64) * (MiB // 64)
            token, buf = writer.buffer()
            buf[:] = payload
            writer.submit(token, index * MiB, MiB, digest_into=digests.slot(index))
            final[index] = payload
        writer.flush()
    for index, payload in final.items():
        assert digests.get(index) == xxhash.xxh3_128_digest(payload), f"chunk {index}"
    other = DigestMap(4, MiB, 4 * MiB)
    for index, payload in final.items():
        other.set(index, xxhash.xxh3_128_digest(payload))
    assert digests.differ(other.raw) == []
    other.set(1, bytes(16))
    assert digests.differ(other.raw) == [1]


def test_writer_refuses_writes_outside_or_misaligned(direct_dir):
    dst = blank_image(direct_dir / "dst.img", ODD_FILE)
    with ChunkWriter(str(dst)) as writer:
        token, _buf = writer.buffer()
        with pytest.raises(DeviceError, match="outside"):
            writer.submit(token, 3 * MiB, 1024)
        with pytest.raises(DeviceError, match="outside"):
            writer.write_zeroes(-512, 512)
        with pytest.raises(DeviceError, match="not aligned"):
            writer.submit(token, 100, 512)
        with pytest.raises(DeviceError, match="does not end at the end"):
            writer.submit(token, 0, 1000)
        with pytest.raises(ValueError, match="not between"):
            writer.submit(token, 0, MiB + 512)
        with pytest.raises(ValueError, match="not a buffer taken"):
            writer.submit(999, 0, 512)
        writer.submit(token, 3 * MiB, 512)  # the real tail is fine
        with pytest.raises(ValueError, match="not a buffer taken"):
            writer.submit(token, 0, 512)  # already submitted


def test_taking_every_buffer_without_submitting(direct_dir):
    dst = blank_image(direct_dir / "dst.img", 4 * MiB)
    with ChunkWriter(str(dst), depth=2) as writer:
        tokens = [writer.buffer()[0] for _ in range(3)]  # depth + 1 buffers
        assert len(set(tokens)) == 3
        with pytest.raises(RuntimeError, match="submit"):
            writer.buffer()
        for i, token in enumerate(tokens):
            writer.submit(token, i * MiB, MiB)
        writer.buffer()  # waits for a write and returns its buffer


def test_writer_exclusive_on_block_devices(direct_dir, losetup):
    dev = losetup(blank_image(direct_dir / "dst.img", 2 * MiB))
    with ChunkWriter(dev):
        with pytest.raises(IOFailure) as info:
            ChunkWriter(dev)
        assert info.value.errno == errno.EBUSY and info.value.path == dev
        with ChunkReader(dev):  # readers do not need the claim
            pass


# -- write errors --------------------------------------------------------------------------------


def test_writer_on_a_missing_target(tmp_path):
    with pytest.raises(IOFailure) as info:
        ChunkWriter(str(tmp_path / "missing.img"))
    assert info.value.errno == errno.ENOENT
    assert "open for writing" in str(info.value) and "missing.img" in str(info.value)
    assert not (tmp_path / "missing.img").exists(), "the writer must not create targets"


def test_writer_on_a_read_only_loop_device(direct_dir, losetup):
    image = write_image(direct_dir / "ro.img", 4 * MiB, seed=30)
    before = image.read_bytes()
    dev = losetup(image, "--read-only")
    with pytest.raises(IOFailure) as info:
        ChunkWriter(dev)
    assert info.value.errno == errno.EROFS and info.value.path == dev
    assert "read-only" in str(info.value)
    assert image.read_bytes() == before


def test_writer_on_a_read_only_mount(tmp_path):
    with _mounted("tmpfs", tmp_path / "ro", "size=8M") as where:
        blank_image(where / "t.img", MiB)
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        with pytest.raises(IOFailure) as info:
            ChunkWriter(str(where / "t.img"))
        assert info.value.errno == errno.EROFS and "t.img" in str(info.value)


def test_writer_on_a_directory(tmp_path):
    with pytest.raises(IOFailure) as info:
        ChunkWriter(str(tmp_path))
    assert info.value.errno == errno.EISDIR


def test_failed_writes_are_reported_not_swallowed(tmp_path):
    """A target on a 2 MiB tmpfs that claims to be 8 MiB: writes past the space fail (ENOSPC) in
    the background; the failure comes out of buffer()/submit()/flush() with path and offset, and a
    `with` block that ends normally raises it from close()."""
    with _mounted("tmpfs", tmp_path / "tiny", "size=2M") as where:
        target = blank_image(where / "t.img", 8 * MiB)
        data = random.Random(31).randbytes(8 * MiB)
        with pytest.raises(IOFailure) as info:
            with ChunkWriter(str(target), depth=4) as writer:
                _write_all(writer, data, range(8))
        err = info.value
        assert err.errno == errno.ENOSPC and err.path == str(target)
        assert err.offset is not None and err.offset >= MiB

        # The same through flush() alone: queue everything that fits in the buffers, then flush.
        target.unlink()
        target = blank_image(where / "t.img", 8 * MiB)
        writer = ChunkWriter(str(target), depth=8)
        try:
            _write_all(writer, data, range(8))
            with pytest.raises(IOFailure) as info:
                writer.flush()
            assert info.value.errno == errno.ENOSPC
            with pytest.raises(IOFailure):  # sticky: later calls keep failing
                writer.buffer()
            with pytest.raises(IOFailure):
                writer.close()
        finally:
            writer.abort()


def test_exception_in_with_block_is_not_masked(direct_dir):
    dst = blank_image(direct_dir / "dst.img", 2 * MiB)
    with pytest.raises(KeyError):
        with ChunkWriter(str(dst)) as writer:
            token, buf = writer.buffer()
            buf[:] = b"\1" * MiB
            writer.submit(token, 0, MiB)
            raise KeyError("caller's own error")


# -- block device facts and zero detection -------------------------------------------------------


def test_blockdev_facts(direct_dir, losetup):
    image = blank_image(direct_dir / "d.img", ODD_DEVICE)
    dev = losetup(image)
    assert blockdev.is_block_device(dev) and not blockdev.is_block_device(image)
    assert not blockdev.is_block_device(direct_dir / "nope")
    assert blockdev.device_size(dev) == ODD_DEVICE == blockdev.device_size(image)
    fd = os.open(dev, os.O_RDONLY)
    try:
        assert blockdev.device_size(fd) == ODD_DEVICE
        assert blockdev.logical_sector_size(fd) == 512
        assert blockdev.is_read_only(fd) is False
    finally:
        os.close(fd)
    assert blockdev.logical_sector_size(image) == 512
    out = subprocess.run(["blockdev", "--getsize64", "--getss", dev], check=True, capture_output=True,
                         text=True).stdout.split()
    assert [int(x) for x in out] == [blockdev.device_size(dev), blockdev.logical_sector_size(dev)]
    dev4k = losetup(image, "--read-only", "--sector-size", "4096")
    assert blockdev.logical_sector_size(dev4k) == 4096 and blockdev.is_read_only(dev4k)
    with pytest.raises(DeviceError):
        blockdev.device_size(direct_dir)
    with pytest.raises(IOFailure):
        blockdev.device_size(direct_dir / "nope")


@settings(max_examples=200, deadline=None)
@given(size=st.sampled_from([1, 15, 16, 17, 31, 32, 33, 4096, CHUNK_SIZE]) | st.integers(1, 70000),
       data=st.data())
def test_is_zero(size, data):
    buf = bytearray(size)
    assert is_zero(buf) and is_zero(bytes(buf)) and is_zero(memoryview(buf)[1:])
    pos = data.draw(st.integers(0, size - 1))
    buf[pos] = data.draw(st.integers(1, 255))
    assert not is_zero(buf)
    assert not is_zero(memoryview(buf))
    assert is_zero(memoryview(buf)[:pos]) and is_zero(memoryview(buf)[pos + 1:])
    assert is_zero(b"")
