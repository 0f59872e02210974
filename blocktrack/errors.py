"""The exceptions blocktrack raises, and the one place where errno values become exceptions.

Every layer raises a subclass of BlocktrackError with a message an operator can act on; the CLI
prints ``blocktrack: <message>`` and exits with the class's exit code. The native wrappers call
``check()`` on every C return value (0 or a byte count on success, ``-errno`` on failure), so no other
module interprets errno numbers.
"""

from __future__ import annotations

import errno as _errno
import os


class BlocktrackError(Exception):
    """Base of every error blocktrack reports to the user."""

    exit_code = 1


class UsageError(BlocktrackError):
    """The command line names something that cannot work (bad mapping, missing file)."""

    exit_code = 2


class StreamError(BlocktrackError):
    """A migration stream is malformed or incomplete.

    ``offset`` is the byte offset in the stream where the problem was found and ``device`` the
    device name of the record being read, when known.
    """

    exit_code = 3

    def __init__(self, message: str, offset: int | None = None, device: str | None = None):
        self.reason = message
        self.offset = offset
        self.device = device
        where = []
        if offset is not None:
            where.append(f"at stream byte {offset}")
        if device is not None:
            where.append(f"device {device!r}")
        super().__init__(message + (f" ({', '.join(where)})" if where else ""))


class StreamTruncated(StreamError):
    """The stream ended in the middle of a record or before its end marker."""


class DeviceError(BlocktrackError):
    """A source or target device cannot be used as asked (wrong size, read error, write error)."""

    exit_code = 4


class IOFailure(DeviceError):
    """An I/O system call on a device or file failed; carries the errno and where."""

    def __init__(self, err: int, what: str, path: str | None = None, offset: int | None = None):
        self.errno = err
        self.path = path
        self.offset = offset
        parts = [what]
        if path is not None:
            parts.append(f"on {path}")
        if offset is not None:
            parts.append(f"at byte {offset}")
        super().__init__(f"{' '.join(parts)}: {os.strerror(err)} ({_errno.errorcode.get(err, err)})")


class PeerError(BlocktrackError):
    """The other end of a transfer went away or answered something unexpected."""

    exit_code = 5


def check(rc: int, what: str, path: str | None = None, offset: int | None = None) -> int:
    """Return ``rc`` when it is >= 0; turn a ``-errno`` return of the C core into an exception."""
    if rc < 0:
        err = -rc
        if err == _errno.ENOMEM:
            raise MemoryError(f"{what}: out of memory")
        raise IOFailure(err, what, path, offset)
    return rc
