"""Unix sockets that exist only with the mode and group they were asked for, whatever the umask.

bind(2) creates a socket's file with mode 0777 & ~umask, and connect(2) checks write permission
only when it connects: a connection made between bind and a later chmod stays open. A socket that
serves root's block device must therefore never be reachable, even for a moment, with a wider mode
than asked (under ``umask 000`` any local user could otherwise connect and keep the connection).

So the socket is bound in a fresh private folder beside its final path (mkdtemp: mode 0700, ours
alone), given its group and mode there, and then hard-linked into place: link(2) never replaces
an existing file, and the final path shows the socket only with its final mode. The bind goes
through ``/proc/self/fd/N/`` of that folder, so the temporary path is never longer than the
108 bytes a socket address may hold. The process's umask is left alone: it is shared by every
thread, and another thread may be creating files at that moment.

If the process is killed in the middle, a folder ``.blocktrack-sock-*`` (mode 0700) is left
beside the socket path.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile

MAX_PATH = 107          # sun_path holds 108 bytes, with the terminating NUL


def bind_private(sock: socket.socket, path: str, *, mode: int = 0o600, gid: int | None = None) -> None:
    """Bind ``sock`` (AF_UNIX) at ``path`` with file mode ``mode`` and, when given, group ``gid``.

    Raises OSError: ENAMETOOLONG for a path clients could not connect to, EEXIST when something
    already is at ``path`` (it is never replaced), or whatever bind, chown or link report."""
    if len(os.fsencode(path)) > MAX_PATH:
        raise OSError(errno.ENAMETOOLONG, "AF_UNIX path too long")
    folder = tempfile.mkdtemp(prefix=".blocktrack-sock-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sock.bind(f"/proc/self/fd/{dir_fd}/s")
            try:
                if gid is not None:
                    os.chown("s", -1, gid, dir_fd=dir_fd, follow_symlinks=False)
                os.chmod("s", mode, dir_fd=dir_fd)
                os.link("s", path, src_dir_fd=dir_fd)
            finally:
                os.unlink("s", dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        os.rmdir(folder)
