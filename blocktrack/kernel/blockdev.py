"""Block-device facts: size, logical sector size, whether a path is a block device.

A regular file stands in for a device everywhere in blocktrack (tests, images), so every function
here accepts one too: its size is ``st_size`` and its sector size 512, the unit of QEMU's wire
format and the O_DIRECT alignment of the filesystems we run on.

Functions take a path or an open file descriptor; with a path, a block device is opened read-only
just long enough for the ioctl.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import struct

from ioctl_opt import IO, IOR

from blocktrack.errors import DeviceError, check

#: ioctl numbers from <linux/fs.h>: BLKGETSIZE64 _IOR(0x12, 114, size_t), BLKSSZGET _IO(0x12, 104),
#: BLKROGET _IO(0x12, 94).
BLKGETSIZE64 = IOR(0x12, 114, ctypes.c_size_t)
BLKSSZGET = IO(0x12, 104)
BLKROGET = IO(0x12, 94)

#: Sector size reported for regular files.
FILE_SECTOR_SIZE = 512


def _os_call(fn, what: str, path):
    try:
        return fn()
    except OSError as e:
        check(-(e.errno or 5), what, str(path))
        raise  # check() always raises for a negative value; this keeps type checkers calm


def _with_fd(path_or_fd, action):
    """Run ``action(fd, st)`` on an fd, opening ``path_or_fd`` read-only when it is a path."""
    if isinstance(path_or_fd, int):
        st = _os_call(lambda: os.fstat(path_or_fd), "stat", f"fd {path_or_fd}")
        return action(path_or_fd, st, f"fd {path_or_fd}")
    path = os.fspath(path_or_fd)
    st = _os_call(lambda: os.stat(path), "stat", path)
    if not stat.S_ISBLK(st.st_mode):
        return action(None, st, path)
    fd = _os_call(lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC), "open", path)
    try:
        return action(fd, st, path)
    finally:
        os.close(fd)


def _kind_error(st, name) -> DeviceError:
    return DeviceError(f"{name} is neither a block device nor a regular file "
                       f"(mode {stat.filemode(st.st_mode)})")


def device_size(path_or_fd) -> int:
    """Size in bytes: BLKGETSIZE64 for a block device, ``st_size`` for a regular file."""

    def action(fd, st, name):
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if not stat.S_ISBLK(st.st_mode):
            raise _kind_error(st, name)
        buf = bytearray(struct.calcsize("Q"))
        _os_call(lambda: fcntl.ioctl(fd, BLKGETSIZE64, buf), "ioctl BLKGETSIZE64", name)
        return struct.unpack("Q", buf)[0]

    return _with_fd(path_or_fd, action)


def logical_sector_size(path_or_fd) -> int:
    """The smallest unit the device addresses (BLKSSZGET); 512 for a regular file."""

    def action(fd, st, name):
        if stat.S_ISREG(st.st_mode):
            return FILE_SECTOR_SIZE
        if not stat.S_ISBLK(st.st_mode):
            raise _kind_error(st, name)
        buf = bytearray(struct.calcsize("i"))
        _os_call(lambda: fcntl.ioctl(fd, BLKSSZGET, buf), "ioctl BLKSSZGET", name)
        return struct.unpack("i", buf)[0]

    return _with_fd(path_or_fd, action)


def is_read_only(path_or_fd) -> bool:
    """True when writes would be refused: a read-only block device (BLKROGET; note that opening
    one for writing succeeds and only the writes fail), or a file on a read-only mount."""

    def action(fd, st, name):
        if stat.S_ISBLK(st.st_mode):
            buf = bytearray(struct.calcsize("i"))
            _os_call(lambda: fcntl.ioctl(fd, BLKROGET, buf), "ioctl BLKROGET", name)
            return struct.unpack("i", buf)[0] != 0
        if stat.S_ISREG(st.st_mode):
            vfs = _os_call(lambda: os.statvfs(name) if fd is None else os.fstatvfs(fd), "statvfs", name)
            return bool(vfs.f_flag & os.ST_RDONLY)
        raise _kind_error(st, name)

    return _with_fd(path_or_fd, action)


def is_block_device(path) -> bool:
    """True for a block device node; False for anything else, including a path that does not exist."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        check(-(e.errno or 5), "stat", os.fspath(path))
        raise
