"""Replacing a small file so that a crash leaves either the old or the new one, never a mix.

The one implementation for every file blocktrack must not lose half-written (enrollment records, saved
dirty maps, migration progress): write a temporary file in the same folder, fsync it, rename it over the
old name, fsync the folder (the rename itself is then durable). OS errors become blocktrack exceptions
through errors.check, naming ``what`` was being written.

The temporary file is made by mkstemp (O_EXCL | O_NOFOLLOW, a random name), so a symbolic link planted
at any name in the folder is never written through, and the rename replaces a link at ``path`` rather
than following it (see safepath.py for the folders themselves).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from blocktrack.errors import check


def fsync_dir(directory: str | os.PathLike) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o600, what: str = "write a state file") -> None:
    """Replace ``path`` with ``data``: temp file + fsync + rename + fsync of the folder."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    except OSError as e:
        check(-(e.errno or 5), f"{what}: create a temporary file", directory)
        raise
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:                        # os.write may write less than asked
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(directory)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            check(-(exc.errno or 5), what, path)
        raise
