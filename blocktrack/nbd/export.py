"""The bytes an NBD server serves: a block device or image file, and the map of chunks it changed.

An ``Export`` knows nothing about the protocol. It reads and writes at arbitrary byte offsets,
flushes, trims, writes zeroes and reports allocation, and it is the one place where blocktrack's
dirty-tracking invariant holds for the NBD front-end:

    every call that can change bytes (write_from, trim, write_zeroes) marks the chunks it touched in
    ``self.dirty`` after the change reached the device (or failed) and before it returns.

The caller replies to the client only after the call returned, so a write is marked before it is
acknowledged. Marking *after* the I/O, not before, is what makes a concurrent sender safe: the
sender clears a chunk's bit and then reads the chunk; if that read raced our write and saw old
bytes, our mark (which comes after the write landed) sets the bit again and the chunk is resent.
Marking before the write would let the sender clear the bit, read old data, and lose the update.
A failed or partial write is marked too: the bytes may have changed.

Direct I/O. Two descriptors are open: one with O_DIRECT (when the filesystem allows it) and one
through the page cache. A request whose offset, length and buffer are aligned to the device's
direct-I/O alignment uses the first, anything else the second; the kernel keeps the two coherent
(direct I/O writes back and invalidates the cached range it touches). EINVAL from an O_DIRECT call
(an unaligned buffer the caller passed in) is retried through the page cache.

Buffers. ``BufferPool`` hands out page-aligned ``mmap`` buffers by power-of-two size class and
keeps a bounded number of them, so a busy connection does not pay for mapping and faulting fresh
pages on every request, and the server's memory stays bounded (which matters once it runs under
mlockall for the kernel backend). A buffer is lent to one request and given back once nothing
refers to it any more (the connection releases its reply's views of it first); the pool never
closes a buffer: one it does not keep is dropped, and its mapping goes with the last reference.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
import threading

from blocktrack.dirtymap import DirtyMap
from blocktrack.errors import DeviceError, UsageError, check
from blocktrack.kernel.blockdev import device_size, logical_sector_size
from blocktrack.nbd.protocol import NBD_STATE_HOLE, NBD_STATE_ZERO

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_PIECE = 1 << 20           # zeroes written per call when fallocate cannot zero
_PROBE = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


class _NotFast(Exception):
    """fallocate cannot zero this range without writing zeroes (it changed nothing)."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); raises OSError."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BufferPool:
    """Page-aligned buffers by power-of-two size class, reused up to ``keep_bytes`` in total.

    With ``limit_bytes``, the buffers lent and those kept for reuse never add up to more than that
    (kept ones are dropped to make room): the server passes its in-flight budget, which already
    bounds the bytes lent, so all request data fits in it.

    Lifetime: ``put`` takes a buffer back only when nothing refers to it any more. The pool never
    calls ``close()``: closing a mapping that a memoryview still exports raises BufferError (and
    reading through that view afterwards would fault), so a buffer that is not kept is simply
    dropped, and CPython unmaps it when its last reference goes.
    """

    MIN_SIZE = 4096

    def __init__(self, keep_bytes: int = 128 << 20, limit_bytes: int | None = None):
        self.keep_bytes = keep_bytes
        self.limit_bytes = limit_bytes
        self._free: dict[int, list[mmap.mmap]] = {}
        self._kept = 0
        self._lent = 0
        self._lock = threading.Lock()

    @classmethod
    def size_class(cls, length: int) -> int:
        size = cls.MIN_SIZE
        while size < length:
            size <<= 1
        return size

    def get(self, length: int) -> mmap.mmap:
        """A buffer of at least ``length`` bytes (its contents are whatever was left in it)."""
        size = self.size_class(length)
        with self._lock:
            self._lent += size
            free = self._free.get(size)
            if free:
                self._kept -= size
                return free.pop()
            if self.limit_bytes is not None:
                self._shrink(self.limit_bytes - self._lent)
        return mmap.mmap(-1, size)

    def put(self, buf: mmap.mmap) -> None:
        """Take back a buffer from get(); the caller holds no view of it any more."""
        size = len(buf)
        with self._lock:
            self._lent -= size
            room = self.keep_bytes
            if self.limit_bytes is not None:
                room = min(room, self.limit_bytes - self._lent)
            if self._kept + size <= room:
                self._free.setdefault(size, []).append(buf)
                self._kept += size

    def _shrink(self, room: int) -> None:
        """Drop kept buffers, largest first, until they fit in ``room`` bytes (lock held)."""
        for size in sorted(self._free, reverse=True):
            free = self._free[size]
            while free and self._kept > max(room, 0):
                free.pop()
                self._kept -= size
            if self._kept <= max(room, 0):
                break

    @property
    def lent_bytes(self) -> int:
        return self._lent

    @property
    def kept_bytes(self) -> int:
        return self._kept

    def clear(self) -> None:
        """Drop every kept buffer."""
        with self._lock:
            self._free.clear()
            self._kept = 0


def _zero_buffer() -> mmap.mmap:
    return mmap.mmap(-1, _ZERO_PIECE)  # anonymous mappings start zeroed; never written to


class Export:
    """A device or image file opened for serving, with its dirty map.

    Attributes: ``path``, ``name`` (the export name clients ask for), ``description``, ``size``
    (bytes, fixed at open), ``read_only``, ``is_block_device``, ``direct`` (an O_DIRECT descriptor is
    in use), ``align`` (its alignment in bytes), ``dirty`` (a DirtyMap over ``size``).

    All methods may be called from several threads at once. I/O errors are raised as OSError (the
    NBD layer turns their errno into the protocol's error numbers); opening raises UsageError or
    DeviceError with a message for the operator.
    """

    def __init__(self, path, *, name: str = "", read_only: bool = False, direct: bool = True,
                 dirty: DirtyMap | None = None, exclusive: bool = True, description: str | None = None):
        self.path = os.fspath(path)
        self.name = name
        self.read_only = read_only
        self._fd = -1
        self._direct_fd = -1
        self._closed = False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise UsageError(f"{self.path}: no such file or block device") from None
        except OSError as exc:
            raise UsageError(f"{self.path}: {exc.strerror}") from None
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if not (self.is_block_device or stat.S_ISREG(st.st_mode)):
            raise UsageError(f"{self.path} is neither a block device nor a regular file "
                             f"(mode {stat.filemode(st.st_mode)})")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            # O_EXCL on a block device refuses one that is mounted or held (like bmaptool does):
            # a device written under a mounted filesystem would be corrupted. The first descriptor
            # holds the claim; the second, non-exclusive open is allowed beside it.
            excl = os.O_EXCL if (self.is_block_device and exclusive and not read_only) else 0
            self._fd = self._open(flags | excl)
            self.size = device_size(self._fd)
            self.sector_size = logical_sector_size(self._fd)
            self.direct, self.align = False, 1
            if direct:
                self._open_direct(flags)
            self.dirty = dirty if dirty is not None else DirtyMap.for_size(self.size)
            if self.dirty.nchunks * self.dirty.chunk_size < self.size:
                raise ValueError(f"dirty map of {self.dirty.nchunks} chunks does not cover {self.size} bytes")
            self.description = description or f"blocktrack: {self.path}"
            self._zeroes = _zero_buffer()
            self._rwf_dsync = getattr(os, "RWF_DSYNC", 0)
        except BaseException:
            self.close()
            raise

    # -- opening --------------------------------------------------------------------------------

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceError(f"{self.path} is in use (mounted, or held by another device or "
                                  f"program); refusing to serve it read-write") from None
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise UsageError(f"cannot open {self.path}: {exc.strerror}"
                                 + ("" if self.read_only else " (try --read-only)")) from None
            check(-(exc.errno or errno.EIO), "open", self.path)
            raise

    def _open_direct(self, flags: int) -> None:
        try:
            fd = os.open(self.path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # this filesystem has no O_DIRECT
                return
            check(-(exc.errno or errno.EIO), "open with O_DIRECT", self.path)
            raise
        # Some filesystems accept O_DIRECT at open and refuse it at the first I/O: probe the
        # smallest alignment that works (sector size first: 512 on most files, 4096 on 4Kn disks).
        probe = mmap.mmap(-1, _PROBE)
        try:
            for align in sorted({self.sector_size, 512, 4096}):
                if align < self.sector_size:
                    continue
                try:
                    os.preadv(fd, [memoryview(probe)[:align]], 0)
                except OSError as exc:
                    if exc.errno == errno.EINVAL:
                        continue
                    os.close(fd)
                    check(-(exc.errno or errno.EIO), "read", self.path, 0)
                    raise
                self._direct_fd, self.direct, self.align = fd, True, align
                return
            os.close(fd)
        finally:
            probe.close()

    # -- helpers --------------------------------------------------------------------------------

    def _fd_for(self, offset: int, length: int) -> int:
        if self.direct and not (offset | length) % self.align:
            return self._direct_fd
        return self._fd

    def _mark(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        if end > offset:
            self.dirty.mark_bytes(offset, end - offset)

    # -- data path ------------------------------------------------------------------------------

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from ``offset``; raise OSError (EIO when the export ends early)."""
        length = len(view)
        fd = self._fd_for(offset, length)
        done = 0
        while done < length:
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.EINVAL and fd == self._direct_fd:
                    fd = self._fd  # an unaligned buffer: retry through the page cache
                    continue
                raise
            if n == 0:
                raise OSError(errno.EIO, f"{self.path} ended at byte {offset + done}, "
                                         f"before the {self.size} bytes seen at open")
            done += n

    def write_from(self, view: memoryview, offset: int, *, fua: bool = False) -> None:
        """Write all of ``view`` at ``offset``; with ``fua``, on stable storage before returning."""
        length = len(view)
        fd = self._fd_for(offset, length)
        flags = self._rwf_dsync if fua else 0
        try:
            done = 0
            while done < length:
                try:
                    n = os.pwritev(fd, [view[done:]], offset + done, flags)
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.EINVAL and fd == self._direct_fd:
                        fd = self._fd
                        continue
                    if exc.errno == errno.EOPNOTSUPP and flags:
                        flags = 0  # no RWF_DSYNC here: write, then fdatasync below
                        continue
                    raise
                if n == 0:
                    raise OSError(errno.EIO, f"short write at byte {offset + done} of {self.path}")
                done += n
            if fua and not flags:
                os.fdatasync(self._fd)
        finally:
            self._mark(offset, length)

    def flush(self) -> None:
        """Every write that completed before this call is on stable storage when it returns.

        One fdatasync covers both descriptors: they share the inode (and, for a block device, the
        device's cache flush)."""
        os.fdatasync(self._fd)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard a range (a hint: the range may read back as zeroes or as before)."""
        try:
            start, end = offset, offset + length
            if self.is_block_device:  # the block layer wants whole sectors: round inwards
                start = -(-start // self.sector_size) * self.sector_size
                end = end // self.sector_size * self.sector_size
            if end > start:
                try:
                    fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENODEV):
                        raise
                    return  # discarding is optional: nothing happened, and that is allowed
            if fua:
                os.fdatasync(self._fd)
        finally:
            self._mark(offset, length)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False, may_trim: bool = True,
                     fast: bool = False) -> None:
        """Make a range read as zeroes.

        ``may_trim`` False is NBD_CMD_FLAG_NO_HOLE (keep the range allocated). ``fast`` is
        NBD_CMD_FLAG_FAST_ZERO: use only a zeroing the storage does without writing the zeroes, and
        raise OSError(ENOTSUP) without changing anything when there is none.
        """
        if fast:
            try:
                self._zero_fast(offset, length, may_trim)
            except _NotFast:
                # Refused before touching anything: nothing changed, nothing to mark.
                raise OSError(errno.ENOTSUP, "this range cannot be zeroed quickly here") from None
            except BaseException:
                self._mark(offset, length)
                raise
        try:
            if not fast:
                self._zero(offset, length, may_trim)
            if fua:
                os.fdatasync(self._fd)
        finally:
            self._mark(offset, length)

    def _zero_fast(self, offset: int, length: int, may_trim: bool) -> None:
        if self.is_block_device:
            # PUNCH_HOLE on a block device never falls back to writing zeroes (ZERO_RANGE may);
            # it needs whole sectors.
            if (offset | length) % self.sector_size:
                raise _NotFast()
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        else:
            mode = (FALLOC_FL_PUNCH_HOLE if may_trim else FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE
        try:
            fallocate(self._fd, mode, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENODEV):
                raise _NotFast() from None
            raise

    def _zero(self, offset: int, length: int, may_trim: bool) -> None:
        start, end = offset, offset + length
        if self.is_block_device:
            # ZERO_RANGE on a block device zeroes whole sectors (offloaded when the device can, by
            # writing zero pages in the kernel otherwise); unaligned edges are written below.
            start = min(-(-offset // self.sector_size) * self.sector_size, end)
            end = max(end // self.sector_size * self.sector_size, start)
            mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        else:
            mode = (FALLOC_FL_PUNCH_HOLE if may_trim else FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE
        if end > start:
            try:
                fallocate(self._fd, mode, start, end - start)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENODEV):
                    raise
                start = end = offset  # nothing zeroed: write all of it
        self._write_zeroes_slowly(offset, start - offset)
        self._write_zeroes_slowly(end, offset + length - end)

    def _write_zeroes_slowly(self, offset: int, length: int) -> None:
        zeroes = memoryview(self._zeroes)
        while length > 0:
            piece = min(length, _ZERO_PIECE)
            fd = self._fd_for(offset, piece)
            n = os.pwritev(fd, [zeroes[:piece]], offset)
            if n == 0:
                raise OSError(errno.EIO, f"short write at byte {offset} of {self.path}")
            offset += n
            length -= n

    def cache(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: ask the kernel to read the range ahead (a hint)."""
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    # -- allocation -----------------------------------------------------------------------------

    def allocation(self, offset: int, end: int, max_extents: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents over ``[offset, end)`` as (length, hole?, zero?) flags.

        Regular files report holes from SEEK_DATA/SEEK_HOLE (a hole reads as zeroes); a block
        device reports everything as allocated data, which the spec allows (status 0)."""
        if self.is_block_device:
            return [(end - offset, 0)]
        hole_flags = NBD_STATE_HOLE | NBD_STATE_ZERO
        extents: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(extents) < max_extents:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data at or after pos
                    if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                        return extents + [(end - pos, 0)]  # no SEEK_DATA here: all data
                    raise
                data = end
            if data > pos:
                stop = min(data, end)
                extents.append((stop - pos, hole_flags))
                pos = stop
                continue
            hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            stop = min(max(hole, pos + 1), end)
            extents.append((stop - pos, 0))
            pos = stop
        return extents

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name in ("_direct_fd", "_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> "Export":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Export({self.path!r}, name={self.name!r}, size={getattr(self, 'size', None)}, "
                f"read_only={self.read_only}, direct={getattr(self, 'direct', None)})")
