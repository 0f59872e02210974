"""Chunked O_DIRECT reads and writes of whole devices, several requests in flight.

This module and ``dirtymap`` are the only Python that touches ``blocktrack._native``. The C core
provides page-aligned buffers (``bt_bufpool``), a pthread pool that runs whole reads and writes
(``bt_aio``: each request loops over short transfers and EINTR) and zero detection. Here we decide
what is an error: a read that stops short of the size seen at open is ``IOFailure(EIO)`` (the device
shrank or went away), and every -errno from C becomes an exception through ``errors.check``.

Buffers and their lifetime. Each reader or writer maps ``depth + 2`` buffers of ``chunk_size`` once
(untouched pages cost no memory, so resident size is about the buffers actually cycled) and recycles
them by index ("token"). The views handed out are slices of one cffi buffer that keeps the mapping
alive, so a view kept past ``close()`` still points at mapped memory (stale, never freed).

Reader pipeline: ``read(chunks)`` keeps ``depth`` requests queued or running while the consumer holds
one buffer, and yields in the order asked, whatever order the reads complete in. Closing the
generator early cancels what has not started and waits for what has, so every buffer is back before
the next ``read``.

Writer ordering: writes run in parallel, so two writes to overlapping bytes could land in either
order. A migration rewrites chunks (bulk pass, then dirty passes), so ``submit`` and
``write_zeroes`` first wait for any in-flight write that overlaps the new one: the last write
submitted for a byte is the one that stays.

Digests: ``read_digested`` and ``submit(..., digest_into=...)`` have the I/O thread that moved a
chunk also hash it (XXH3-128, ``digest128``), so verification re-reads nothing and costs the
calling thread nothing: the digest of a read covers the chunk's bytes inside a given size, the
digest of a write the ``length`` bytes written.

O_DIRECT fallback: where the filesystem refuses O_DIRECT (EINVAL at open, as tmpfs on older kernels
and ramfs do, or at the first aligned read), both classes use buffered I/O and say so in ``.direct``.
A writer's unaligned tail (only allowed at the very end of the target) goes through a second,
buffered descriptor; ``flush`` syncs both.

Writer safety: block devices are opened with O_EXCL (a mounted or claimed device is refused with
EBUSY), and a read-only device is refused at open (EROFS) rather than at the first write, because
opening a read-only block device for writing succeeds and only the writes fail.
"""

from __future__ import annotations

import errno
import operator
import os
import stat
from collections import deque
from typing import Iterable, Iterator

from blocktrack._native import ffi, lib
from blocktrack.errors import DeviceError, IOFailure, check
from blocktrack.kernel.blockdev import device_size, is_read_only, logical_sector_size

CHUNK_SIZE = 1 << 20

_ZERO_TAG_BASE = 1 << 32  # tags of write_zeroes requests; buffer tokens are small integers
_PROBE_BYTES = 4096
_REAP_SLICE_MS = 250


DIGEST_SIZE = 16


def digest128(buf) -> bytes:
    """XXH3-128 of ``buf`` (bytes-like, C-contiguous), canonical big-endian: the chunk digest."""
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("digest128 needs a contiguous buffer")
    out = ffi.new("uint8_t[]", DIGEST_SIZE)
    check(lib.bt_digest128(ffi.from_buffer(view), view.nbytes, out), "digest")
    return bytes(ffi.buffer(out, DIGEST_SIZE))


def is_zero(buf) -> bool:
    """True when every byte of ``buf`` (bytes-like, C-contiguous) is zero."""
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("is_zero needs a contiguous buffer")
    if view.nbytes == 0:
        return True
    return bool(lib.bt_is_zero(ffi.from_buffer(view), view.nbytes))


# -- internals shared by reader and writer --------------------------------------------------------


def _os_check(fn, what: str, path: str, offset: int | None = None):
    """Call ``fn``; an OSError becomes the IOFailure that ``errors.check`` makes of its errno."""
    try:
        return fn()
    except OSError as e:
        check(-(e.errno or errno.EIO), what, path, offset)
        raise


def _open(path: str, flags: int, direct: bool, what: str) -> tuple[int, bool]:
    """Open with O_DIRECT when asked and allowed; return (fd, direct)."""
    flags |= os.O_CLOEXEC
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT; fall back
                check(-(e.errno or errno.EIO), what, path)
                raise
    return _os_check(lambda: os.open(path, flags), what, path), False


def _check_geometry(chunk_size: int, depth: int) -> None:
    if chunk_size <= 0 or chunk_size % 512:
        raise ValueError(f"chunk_size must be a positive multiple of 512, got {chunk_size}")
    if not 1 <= depth <= 1024:
        raise ValueError(f"depth must be between 1 and 1024, got {depth}")


class _Pool:
    """``nbufs`` page-aligned buffers of ``buf_size`` bytes from the C pool.

    The mapping is unmapped when the last reference to ``base`` goes: held by this object, by the
    cffi buffer behind every view, and by the engine's destructor (so no worker can write into
    unmapped memory even when both are garbage-collected together).
    """

    def __init__(self, buf_size: int, nbufs: int):
        st = ffi.new("struct bt_bufpool *")
        check(lib.bt_bufpool_init(st, buf_size, nbufs), "allocate I/O buffers")
        self.base = ffi.gc(ffi.cast("char *", st.base), lambda _p, st=st: lib.bt_bufpool_free(st))
        self.stride = st.buf_size
        whole = memoryview(ffi.buffer(self.base, st.map_len))
        self.views = [whole[i * self.stride: i * self.stride + buf_size] for i in range(nbufs)]

    def ptr(self, token: int):
        return self.base + token * self.stride


class _Engine:
    """The C pthread pool: submit requests, reap completions (waiting in C, GIL released)."""

    def __init__(self, nthreads: int, capacity: int, pool: _Pool):
        out = ffi.new("struct bt_aio **")
        check(lib.bt_aio_create(out, nthreads, capacity), "start I/O threads")
        # bt_aio_destroy joins the workers; the lambda holds the pool's memory until then.
        self._aio = ffi.gc(out[0], lambda p, keep=pool.base: lib.bt_aio_destroy(p))
        self.capacity = capacity
        self.outstanding = 0
        self._out = ffi.new("struct bt_completion[]", capacity)

    def submit(self, fd: int, op: int, ptr, length: int, offset: int, tag: int, path: str,
               digest=ffi.NULL, digest_len: int = 0) -> None:
        """Queue one request; with ``digest`` (a uint8_t[16] pointer) the worker also hashes the
        first ``digest_len`` bytes of the buffer into it after the transfer (bt_aio_submit_digest)."""
        what = "submit read" if op == lib.BT_OP_READ else "submit write"
        check(lib.bt_aio_submit_digest(self._aio, fd, op, ptr, length, offset, tag, digest, digest_len),
              what, path, offset)
        self.outstanding += 1

    def reap(self, min_complete: int = 1) -> list[tuple[int, int]]:
        """Wait for up to ``min_complete`` completions; return at least one (none only when nothing
        is outstanding), maybe fewer than asked: callers loop.

        The wait happens in C with the GIL released, in slices of _REAP_SLICE_MS, so that a signal
        (Ctrl-C) is handled by Python between slices even when a device stops answering.
        """
        while True:
            n = lib.bt_aio_reap(self._aio, self._out, self.capacity, min_complete, _REAP_SLICE_MS)
            if n or not self.outstanding:
                self.outstanding -= n
                return [(self._out[i].tag, self._out[i].result) for i in range(n)]

    def drain(self) -> list[tuple[int, int]]:
        """Cancel what has not started, wait for what has; return every completion."""
        lib.bt_aio_cancel(self._aio)
        done = []
        while self.outstanding:
            done.extend(self.reap(self.outstanding))
        return done

    def destroy(self) -> None:
        if self._aio is not None:
            ffi.release(self._aio)  # runs bt_aio_destroy now
            self._aio = None


# -- reader ---------------------------------------------------------------------------------------


class ChunkReader:
    """Read a device or file in chunks with O_DIRECT, ``depth`` reads in flight.

    Attributes: ``path``, ``size`` (bytes, at open), ``nchunks``, ``chunk_size``, ``depth``,
    ``sector_size`` and ``direct`` (False when the filesystem refused O_DIRECT). One thread uses a
    reader at a time, and one ``read`` generator runs at a time (``read_one`` may be called while it
    is suspended).
    """

    def __init__(self, path: str, *, chunk_size: int = CHUNK_SIZE, depth: int = 8, direct: bool = True):
        _check_geometry(chunk_size, depth)
        self.path = os.fspath(path)
        self.chunk_size = chunk_size
        self.depth = depth
        self._fd = -1
        self._pool: _Pool | None = None
        self._engine: _Engine | None = None
        self._reading = False
        self._closed = False
        try:
            self._fd, self.direct = _open(self.path, os.O_RDONLY, direct, "open for reading")
            self.size = device_size(self._fd)
            self.sector_size = logical_sector_size(self._fd)
            self.nchunks = -(-self.size // chunk_size)
            if self.direct and chunk_size % self.sector_size:
                raise DeviceError(f"chunk size {chunk_size} is not a multiple of {self.path}'s "
                                  f"{self.sector_size}-byte sectors")
            # depth buffers in flight + 1 held by the consumer + 1 for read_one.
            self._pool = _Pool(chunk_size, depth + 2)
            self._digests = ffi.new("uint8_t[]", (depth + 2) * DIGEST_SIZE)  # one slot per buffer
            if self.direct:
                self._probe_direct()
            self._engine = _Engine(depth, depth, self._pool)
        except BaseException:
            self._release()
            raise

    def _probe_direct(self) -> None:
        """Some filesystems accept O_DIRECT at open and refuse it at the first read: try one."""
        if self.size == 0:
            return
        length = min(_PROBE_BYTES, self.chunk_size)
        rc = lib.bt_pread_full(self._fd, self._pool.ptr(self.depth + 1), length, 0)
        if rc == -errno.EINVAL:
            os.close(self._fd)
            self._fd = -1
            self._fd, self.direct = _open(self.path, os.O_RDONLY, False, "open for reading")
        else:
            check(rc, "read", self.path, 0)

    # -- public API -------------------------------------------------------------------------------

    def read(self, chunks: Iterable[int]) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(index, view)`` for each chunk index of ``chunks``, in that order.

        ``view`` holds the chunk's bytes (the tail chunk is short) and is valid only until the
        generator is advanced: its buffer is then reused. A failed read raises IOFailure with the
        path and byte offset; a read that ends early (the device shrank) raises IOFailure(EIO).
        """
        self._ensure_open()
        return self._read(iter(chunks), None)

    def read_digested(self, chunks: Iterable[int], size: int | None = None
                      ) -> Iterator[tuple[int, memoryview, bytes]]:
        """As ``read``, yielding ``(index, view, digest)``: the XXH3-128 (``digest128``) of the
        chunk's bytes inside ``size`` (default the size at open; a migration hashes the source
        device's size on a larger target), computed by the I/O thread that read it."""
        self._ensure_open()
        return self._read(iter(chunks), self.size if size is None else size)

    def read_one(self, index: int) -> bytes:
        """The bytes of one chunk, read synchronously."""
        self._ensure_open()
        index, offset, expected = self._locate(index)
        token = self.depth + 1
        rc = lib.bt_pread_full(self._fd, self._pool.ptr(token), self.chunk_size, offset)
        self._check_read(rc, offset, expected)
        return bytes(self._pool.views[token][:expected])

    def close(self) -> None:
        """Stop any read in progress (waiting for requests already running) and release everything."""
        self._release()

    def __enter__(self) -> "ChunkReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._release()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"ChunkReader({self.path!r}, size={getattr(self, 'size', None)}, "
                f"chunk_size={self.chunk_size}, depth={self.depth}, direct={getattr(self, 'direct', None)})")

    # -- internals --------------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise ValueError(f"I/O on a closed ChunkReader ({self.path})")

    def _locate(self, index) -> tuple[int, int, int]:
        index = operator.index(index)
        if not 0 <= index < self.nchunks:
            raise IndexError(f"chunk {index} is outside {self.path} ({self.nchunks} chunks)")
        offset = index * self.chunk_size
        return index, offset, min(self.chunk_size, self.size - offset)

    def _check_read(self, rc: int, offset: int, expected: int) -> None:
        # The operator needs the chunk (what the migration was copying) as well as the byte offset.
        check(rc, f"read of chunk {offset // self.chunk_size}", self.path, offset)
        if rc < expected:
            raise IOFailure(errno.EIO, f"short read (got {rc} of {expected} bytes: did the device shrink?)",
                            self.path, offset)

    def _read(self, chunks: Iterator[int], digest_size: int | None) -> Iterator[tuple]:
        if self._reading:
            raise RuntimeError(f"a read() of {self.path} is already running; finish or close it first")
        self._reading = True
        engine = self._engine
        free = list(range(self.depth + 1))   # tokens; the last buffer belongs to read_one
        pending: deque = deque()             # (index, offset, expected, token), in yield order
        results: dict[int, int] = {}         # token -> bytes read or -errno, once reaped
        exhausted = False
        view = None

        def fill() -> None:
            nonlocal exhausted
            while len(pending) < self.depth and free and not exhausted:
                try:
                    item = next(chunks)
                except StopIteration:
                    exhausted = True
                    return
                index, offset, expected = self._locate(item)
                token = free.pop()
                try:
                    # Always ask for a whole chunk: at the end of the device or file the read just
                    # stops there, and O_DIRECT needs no special length for the tail.
                    if digest_size is None:
                        engine.submit(self._fd, lib.BT_OP_READ, self._pool.ptr(token), self.chunk_size,
                                      offset, token, self.path)
                    else:
                        engine.submit(self._fd, lib.BT_OP_READ, self._pool.ptr(token), self.chunk_size,
                                      offset, token, self.path, self._digests + token * DIGEST_SIZE,
                                      max(0, min(self.chunk_size, digest_size - offset)))
                except BaseException:
                    free.append(token)
                    raise
                pending.append((index, offset, expected, token))

        try:
            while True:
                self._ensure_open()
                fill()
                if not pending:
                    return
                index, offset, expected, token = pending[0]
                while token not in results:
                    results.update(engine.reap(1))
                pending.popleft()
                rc = results.pop(token)
                try:
                    self._check_read(rc, offset, expected)
                    fill()  # keep depth reads going while the consumer works on this chunk
                except BaseException:
                    free.append(token)
                    raise
                view = self._pool.views[token][:expected]
                if digest_size is None:
                    yield index, view
                else:
                    yield index, view, bytes(ffi.buffer(self._digests + token * DIGEST_SIZE, DIGEST_SIZE))
                try:
                    view.release()  # a consumer that kept it gets an error, not recycled bytes
                except BufferError:
                    pass
                view = None
                free.append(token)
        finally:
            if view is not None:
                try:
                    view.release()
                except BufferError:
                    pass
            if not self._closed and engine is self._engine:
                engine.drain()
            self._reading = False

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.drain()
            engine.destroy()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._pool = None


# -- writer ---------------------------------------------------------------------------------------


class ChunkWriter:
    """Write chunks to an existing device or file with O_DIRECT, ``depth`` writes in flight.

    Use: ``token, buf = w.buffer()``, fill ``buf``, ``w.submit(token, offset, length)``; at the end
    ``w.flush()`` (or leave the ``with`` block normally), which waits for every write, raises the
    first failure and syncs. A write failure is sticky: every later ``buffer``, ``submit``,
    ``write_zeroes``, ``flush`` and ``close`` raises it, since the target is now not what the
    caller wrote.

    A block device is opened with O_EXCL (``exclusive=True``), so a mounted or otherwise claimed
    device is refused (EBUSY) instead of overwritten.
    """

    def __init__(self, path: str, *, chunk_size: int = CHUNK_SIZE, depth: int = 8, direct: bool = True,
                 exclusive: bool = True):
        _check_geometry(chunk_size, depth)
        self.path = os.fspath(path)
        self.chunk_size = chunk_size
        self.depth = depth
        self._fd = -1
        self._tail_fd = -1
        self._pool: _Pool | None = None
        self._engine: _Engine | None = None
        self._closed = False
        self._failure: IOFailure | None = None
        self._free: list[int] = []
        self._lent: set[int] = set()
        self._inflight: dict[int, tuple[int, int, int | None]] = {}  # tag -> (offset, length, token)
        self._digest_into: dict[int, object] = {}  # tag -> the caller's digest buffer (kept alive)
        self._zero_seq = 0
        try:
            flags = os.O_WRONLY
            st = _os_check(lambda: os.stat(self.path), "open for writing", self.path)
            self._is_block = stat.S_ISBLK(st.st_mode)
            if exclusive and self._is_block:
                flags |= os.O_EXCL
            self._fd, self.direct = _open(self.path, flags, direct, "open for writing")
            if is_read_only(self._fd):
                # A read-only block device opens for writing and fails each write (EPERM): say so now.
                check(-errno.EROFS, "open for writing (the target is read-only)", self.path)
            self.size = device_size(self._fd)
            self.sector_size = logical_sector_size(self._fd)
            if self.direct and chunk_size % self.sector_size:
                raise DeviceError(f"chunk size {chunk_size} is not a multiple of {self.path}'s "
                                  f"{self.sector_size}-byte sectors")
            # depth in flight + 1 being filled by the caller + 1 that stays zero for write_zeroes.
            self._pool = _Pool(chunk_size, depth + 2)
            self._zero_token = depth + 1
            self._free = list(range(depth + 1))
            self._engine = _Engine(depth, depth, self._pool)
        except BaseException:
            self._release()
            raise

    # -- public API -------------------------------------------------------------------------------

    def buffer(self) -> tuple[int, memoryview]:
        """A free page-aligned buffer of ``chunk_size`` bytes and its token; waits for a write to
        finish when all are busy, raising IOFailure if a write failed."""
        self._ensure_usable()
        while not self._free:
            if not self._inflight:
                raise RuntimeError(f"every buffer of the writer for {self.path} is taken and none is being "
                                   "written: submit() the buffers you took")
            self._reap(1)
            self._raise_failure()
        token = self._free.pop()
        self._lent.add(token)
        return token, self._pool.views[token][:]  # a fresh view: the caller may release it

    def submit(self, token: int, offset: int, length: int, digest_into=None) -> None:
        """Write ``buf[:length]`` at ``offset`` in the background; the buffer is then free again.

        ``offset`` must be a multiple of the sector size; ``length`` (at most ``chunk_size``) may be
        unaligned only when the write ends exactly at the end of the target.

        ``digest_into``: a writable 16-byte buffer that receives the XXH3-128 of the ``length``
        bytes once they are written (by the I/O thread; read it after ``flush``). The caller keeps
        it alive; so does the writer while the write runs.
        """
        self._ensure_usable()
        if token not in self._lent:
            raise ValueError(f"token {token!r} is not a buffer taken from this writer")
        if not 0 <= length <= self.chunk_size:
            raise ValueError(f"length {length} is not between 0 and the chunk size {self.chunk_size}")
        self._check_target_range(offset, length)
        self._lent.discard(token)
        try:
            self._write(token, token, self._pool.ptr(token), offset, length, digest_into)
        except BaseException:
            if token not in self._inflight:
                self._free.append(token)
            raise

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zeros over ``[offset, offset + length)`` (same rules as ``submit``, any length)."""
        self._ensure_usable()
        self._check_target_range(offset, length)
        pos, end = offset, offset + length
        while pos < end:
            n = min(self.chunk_size, end - pos)
            self._zero_seq += 1
            self._write(_ZERO_TAG_BASE + self._zero_seq, None, self._pool.ptr(self._zero_token), pos, n)
            pos += n

    def flush(self) -> None:
        """Wait for every write, raise the first failure, then fdatasync."""
        self._ensure_open()
        while self._inflight:
            self._reap(len(self._inflight))
        self._raise_failure()
        for fd in (self._fd, self._tail_fd):
            if fd >= 0:
                rc = lib.bt_fdatasync(fd)
                if rc < 0:
                    self._fail(IOFailure(-rc, "fdatasync", self.path))
                    self._raise_failure()

    def close(self) -> None:
        """Flush (raising its failure, if any) and release everything, even when the flush fails."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._release()

    def abort(self) -> None:
        """Release without flushing: queued writes are cancelled, running ones awaited, errors dropped."""
        self._release()

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()  # the exception already on its way out is the one to report

    def __del__(self):
        try:
            self._release()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"ChunkWriter({self.path!r}, size={getattr(self, 'size', None)}, "
                f"chunk_size={self.chunk_size}, depth={self.depth}, direct={getattr(self, 'direct', None)})")

    # -- internals --------------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise ValueError(f"I/O on a closed ChunkWriter ({self.path})")

    def _ensure_usable(self) -> None:
        self._ensure_open()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fail(self, failure: IOFailure) -> None:
        if self._failure is None:
            self._failure = failure

    def _check_target_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DeviceError(f"write of {length} bytes at byte {offset} falls outside {self.path} "
                              f"({self.size} bytes)")
        if offset % self.sector_size:
            raise DeviceError(f"write at byte {offset} of {self.path} is not aligned to its "
                              f"{self.sector_size}-byte sectors")
        if length % self.sector_size and offset + length != self.size:
            raise DeviceError(f"write of {length} bytes at byte {offset} of {self.path} is not a whole "
                              f"number of {self.sector_size}-byte sectors and does not end at the end "
                              f"of the target")

    def _write(self, tag: int, token: int | None, ptr, offset: int, length: int, digest_into=None) -> None:
        """Write ``length`` bytes from ``ptr``: the sector-aligned part in the background, an
        unaligned tail (end of target only) synchronously through the buffered descriptor. The
        digest (if asked) covers all ``length`` bytes: the background request hashes them."""
        aligned = length - length % self.sector_size if self.direct else length
        digest = ffi.NULL
        if digest_into is not None:
            digest = ffi.from_buffer("uint8_t[]", digest_into, require_writable=True)
            if len(digest) != DIGEST_SIZE:
                raise ValueError(f"digest_into must be {DIGEST_SIZE} bytes, not {len(digest)}")
        if aligned < length:
            tail_offset, tail_length = offset + aligned, length - aligned
            self._wait_overlap(tail_offset, tail_length)
            rc = lib.bt_pwrite_full(self._buffered_fd(), ptr + aligned, tail_length, tail_offset)
            self._check_write(rc, tail_offset, tail_length)
            self._raise_failure()
        if aligned == 0:
            if digest != ffi.NULL:  # smaller than a sector: nothing went to the background to hash it
                check(lib.bt_digest128(ptr, length, digest), "digest")
            if token is not None:
                self._free.append(token)
            return
        self._wait_overlap(offset, aligned)
        while self._engine.outstanding >= self._engine.capacity:
            self._reap(1)
        self._engine.submit(self._fd, lib.BT_OP_WRITE, ptr, aligned, offset, tag, self.path,
                            digest, length if digest != ffi.NULL else 0)
        self._inflight[tag] = (offset, aligned, token)
        if digest != ffi.NULL:
            self._digest_into[tag] = digest

    def _buffered_fd(self) -> int:
        if not self.direct:
            return self._fd
        if self._tail_fd < 0:
            self._tail_fd = _os_check(lambda: os.open(self.path, os.O_WRONLY | os.O_CLOEXEC),
                                      "open for writing", self.path)
        return self._tail_fd

    def _wait_overlap(self, offset: int, length: int) -> None:
        end = offset + length
        while any(o < end and offset < o + n for o, n, _t in self._inflight.values()):
            self._reap(1)

    def _check_write(self, rc: int, offset: int, length: int) -> None:
        if rc < 0:
            self._fail(IOFailure(-rc, "write", self.path, offset))
        elif rc != length:
            self._fail(IOFailure(errno.EIO, f"short write ({rc} of {length} bytes)", self.path, offset))

    def _reap(self, min_complete: int) -> None:
        for tag, rc in self._engine.reap(min_complete):
            offset, length, token = self._inflight.pop(tag)
            self._digest_into.pop(tag, None)
            if rc != -errno.ECANCELED:
                self._check_write(rc, offset, length)
            if token is not None:
                self._free.append(token)

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            for tag, _rc in engine.drain():
                self._inflight.pop(tag, None)
                self._digest_into.pop(tag, None)
            engine.destroy()
        for name in ("_tail_fd", "_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self._pool = None
