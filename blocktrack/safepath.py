"""blocktrack's state folders and the files in them, used so that nobody but root (or the caller)
can redirect them.

blocktrack runs as root and keeps state in folders: the state directory (/var/lib/blocktrack, with
``devices/``, ``locks/`` and ``migrations/``) and /run/blocktrack (the nbd backend's control
sockets). Whoever can change one of those folders, or any folder above one, could make root write,
create or truncate a file of their choosing (a symbolic link planted at a name root is about to
open), or trust a record of their making (an enrollment record names the device-mapper table that
``unenroll`` loads). So:

* A folder is trusted when it is a real folder (not a symbolic link), owned by root or by the user
  running blocktrack, and writable by neither its group nor others; and every folder from ``/``
  down to it is trusted too. Above blocktrack's own folders (the state directory, /run/blocktrack),
  a folder with the sticky bit (``/tmp``) may be writable by others: they can add entries there but
  not rename or remove ours, and an entry they added first is refused by the owner check. Symbolic
  links are refused, not followed: a link is only as safe as whoever could have made it, and naming
  the real path instead is an easy fix.
  (Access control lists are not looked at.)
* Folders blocktrack creates are 0700 whatever the umask, missing parents included.
* Files are opened with O_NOFOLLOW and must be regular files. Files that replace others are written
  to an O_EXCL temporary file with a random name and renamed over the old one (atomicfile.py): a
  rename replaces a link, it never follows it.

Once a folder is trusted nobody else can change what is in it, which is why paths inside it may then
be used as they are (no openat() dance): the checks are what keep those paths stable.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from blocktrack.errors import UnsafePath, UsageError, refuse_symlink

FOLDER_MODE = 0o700


def trusted_uids() -> tuple[int, ...]:
    """Root, and the user running blocktrack (tests and tools run without root)."""
    return (0, os.geteuid())


def secure_folder(path, *, create: bool = True, base=None) -> Path | None:
    """``path`` made absolute, once it and every folder above it are trusted (module docstring).

    ``base`` is the outermost of blocktrack's own folders on the way (the state directory; default
    ``path`` itself): from it down no folder may be writable by others, sticky bit or not. Missing
    folders are created 0700 when ``create``; otherwise a missing folder returns None (nothing is
    kept there yet). Raises UnsafePath for a folder someone else could change."""
    path = Path(os.path.abspath(path))
    base = Path(os.path.abspath(base)) if base is not None else path
    if base != path and base not in path.parents:
        raise ValueError(f"{base} is not a folder above {path}")
    own_from = len(base.parts)                 # components from this many parts on are blocktrack's own
    parts = path.parts
    current = Path(parts[0])
    _check(current, _lstat(current), own=own_from == 1)
    for depth, name in enumerate(parts[1:], 2):
        current = current / name
        st = _lstat(current)
        if st is None:
            if not create:
                return None
            _make(current)
            st = _lstat(current)
            if st is None:
                raise UsageError(f"the state folder {current} vanished as it was created")
        _check(current, st, own=depth >= own_from)
    return path


def is_folder(path) -> bool:
    """A real folder (a symbolic link to one is not)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def open_file(path, flags: int, mode: int = 0o600) -> int:
    """os.open with O_NOFOLLOW; the file must be a regular file (not a device node or a FIFO, whose
    open alone may act; O_NONBLOCK keeps a FIFO's open from hanging and means nothing for a regular
    file). A symbolic link raises UnsafePath; other OSErrors are the caller's."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        refuse_symlink(exc, path)
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(f"{path} is not a regular file: blocktrack keeps only regular files in its state "
                             "folders; remove it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(path) -> bytes:
    """The whole of a regular file, opened as open_file() does (FileNotFoundError when missing)."""
    fd = open_file(path, os.O_RDONLY)
    try:
        pieces = []
        while True:
            piece = os.read(fd, 1 << 20)
            if not piece:
                return b"".join(pieces)
            pieces.append(piece)
    finally:
        os.close(fd)


# -- internals ---------------------------------------------------------------------------------------


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"cannot use the state folder {path}: {exc.strerror}") from None


def _make(path: Path) -> None:
    try:
        os.mkdir(path, FOLDER_MODE)
    except FileExistsError:
        return                              # made meanwhile: checked below like any existing folder
    except OSError as exc:
        raise UsageError(f"cannot create the state folder {path}: {exc.strerror} (choose another with "
                         "--state-dir or BLOCKTRACK_STATE_DIR)") from None
    # The umask may have taken bits away (umask 0777 leaves 0000). The parent is trusted, so nobody
    # else can have replaced what we just made: the path is safe to use.
    os.chmod(path, FOLDER_MODE)


def _check(path: Path, st: os.stat_result, *, own: bool) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{path} is a symbolic link (to {os.path.realpath(path)}): blocktrack does not follow "
                         "links on the way to its state folders (whoever can change a link can redirect "
                         "them); name the real path instead")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is not a folder: it cannot hold blocktrack's state")
    if st.st_uid not in trusted_uids():
        raise UnsafePath(f"{path} is owned by uid {st.st_uid}{_user(st.st_uid)}, not by root or uid "
                         f"{os.geteuid()}: that user could change what blocktrack keeps there; fix the "
                         f"owner (`chown root {path}`) or choose another state folder")
    writable = [who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if st.st_mode & bit]
    if writable and (own or not st.st_mode & stat.S_ISVTX):
        raise UnsafePath(f"{path} is writable by {' and '.join(writable)} (mode {stat.S_IMODE(st.st_mode):04o}): "
                         f"they could replace what blocktrack keeps there; `chmod go-w {path}`, or choose "
                         "another state folder")


def _user(uid: int) -> str:
    try:
        return f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return ""
