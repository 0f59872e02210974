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


class UnsafePath(UsageError):
    """A state folder or file that someone other than root (or the caller) could change or redirect: a
    symbolic link, a folder owned by another user, a folder writable by group or others. Refused, never
    repaired silently (see blocktrack/safepath.py)."""


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


class PeerStalled(PeerError):
    """Nothing came from (or could be sent to) the peer for --stall-timeout seconds: a stopped
    process, a dead host, or a network that stopped forwarding. Exit code 5 like any lost peer."""


class AuthenticationError(PeerError):
    """The peer could not prove who it is (TLS certificate, pre-shared key), or we could not: the
    connection is closed before any stream byte is read or written."""


def check(rc: int, what: str, path: str | None = None, offset: int | None = None) -> int:
    """Return ``rc`` when it is >= 0; turn a ``-errno`` return of the C core into an exception."""
    if rc < 0:
        err = -rc
        if err == _errno.ENOMEM:
            raise MemoryError(f"{what}: out of memory")
        raise IOFailure(err, what, path, offset)
    return rc


def refuse_symlink(exc: OSError, path) -> None:
    """After an open with O_NOFOLLOW failed: raise UnsafePath when the reason is a symbolic link at
    ``path`` (ELOOP); otherwise return, and the caller handles ``exc`` as any other OSError."""
    if exc.errno == _errno.ELOOP:
        raise UnsafePath(f"{path} is a symbolic link: blocktrack does not follow links in its state folders "
                         "(someone else may have planted it); remove it") from None


# -- tracking backends, device-mapper and LVM (blocktrack.backends, blocktrack.kernel) ---------------

class KernelToolError(DeviceError):
    """A kernel tool (dmsetup, lvm) refused or failed; ``argv`` and its ``stderr`` say what and why."""

    def __init__(self, argv, returncode: int, stderr: str, what: str | None = None):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        detail = self.stderr.splitlines()[-1] if self.stderr else f"exit status {returncode}"
        super().__init__(f"{what or ' '.join(self.argv[:2])}: {detail}")


class DmIoctlError(IOFailure):
    """A device-mapper ioctl failed. The kernel returns only an errno; ``kernel_says`` holds what it
    logged about it (a target constructor's reason, say), when that could be read."""

    def __init__(self, err: int, what: str, name: str, kernel_says: str = ""):
        super().__init__(err, f"device-mapper: {what}", name)
        self.name = name
        self.kernel_says = kernel_says
        if kernel_says:
            self.args = (f"{self.args[0]} (kernel: {kernel_says})",)


class NotEnrolled(UsageError):
    """The device named is not enrolled (see ``blocktrack status``)."""


class AlreadyEnrolled(UsageError):
    """The device is already enrolled, or already stacked on by someone else's device-mapper layer."""


class TrackingError(DeviceError):
    """A backend cannot say which chunks changed: its kernel state is gone, replaced or damaged.

    Never answered with "nothing dirty": the caller must treat the whole device as changed or stop.
    """


class MetadataError(TrackingError):
    """On-disk tracking metadata (era metadata, a snapshot's exception store) is not what it should be."""

    def __init__(self, path, reason: str, location: int | None = None):
        self.path = str(path)
        self.reason = reason
        self.location = location
        where = f" (block {location})" if location is not None else ""
        super().__init__(f"{self.path}: {reason}{where}")


class StateError(BlocktrackError):
    """The state directory (/var/lib/blocktrack or --state-dir) is unusable or holds a damaged record."""


class FaultInjected(BlocktrackError):
    """Raised at a fault point named in BLOCKTRACK_FAULT (tests only)."""


class AllDirtyWarning(UserWarning):
    """A backend lost track of what changed (overflowed snapshot, lost metadata) and reports every chunk dirty."""
