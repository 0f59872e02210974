"""The state directory: what must outlive a blocktrack process (which devices are enrolled, the hidden
devices and volumes made for them, their checkpoints).

Location: ``--state-dir``, else ``$BLOCKTRACK_STATE_DIR``, else ``/var/lib/blocktrack``. Layout::

    devices/<id>.json     one record per enrolled device (JSON, see backends/base.py for its fields)
    devices/<id>.d/       per-device files a backend keeps (the snapshot backend's interval maps)
    locks/<id>.lock       flock(2) held by whichever blocktrack process works on the device

Every file is replaced atomically: written to a temporary file in the same folder, fsync'ed, renamed
over the old one, and the folder fsync'ed; a reader sees the old or the new file, never a mix, even
after a crash. A record is written *before* the kernel change it describes (with its phase, e.g.
``enrolling``) so that a process killed half-way leaves enough behind for ``unenroll`` to undo it.

The folders are 0700 and used only while nobody but root (or the caller) can change them or any
folder above them, and no file in them is opened through a symbolic link (safepath.py): a record
names the device-mapper tables that ``unenroll`` loads, so a record someone else could write would
be theirs to load.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from blocktrack.atomicfile import atomic_write, fsync_dir  # noqa: F401  (re-exported for the backends)
from blocktrack.errors import StateError
from blocktrack.safepath import is_folder, open_file, read_file, secure_folder

DEFAULT_STATE_DIR = "/var/lib/blocktrack"
ENV_VAR = "BLOCKTRACK_STATE_DIR"


def resolve(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get(ENV_VAR) or DEFAULT_STATE_DIR)


class StateDir:
    """One state directory. Methods raise StateError when it cannot be used."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = resolve(path)
        self.devices = self.path / "devices"
        self.locks = self.path / "locks"
        self._trusted = False

    def ensure(self) -> "StateDir":
        """Create what is missing (0700), and check that nobody else can change any of it."""
        for d in (self.path, self.devices, self.locks):
            secure_folder(d, base=self.path)
        self._trusted = True
        return self

    def _check_trusted(self) -> bool:
        """Before trusting anything read here: the folders that exist are trusted (UnsafePath if not).
        False when there is no devices folder yet (nothing recorded)."""
        if not self._trusted:
            if (secure_folder(self.path, create=False) is None
                    or secure_folder(self.devices, create=False, base=self.path) is None):
                return False
            self._trusted = True
        return True

    def device_folder(self, ident: str) -> Path:
        """The device's own folder (``device_dir``), created 0700 and checked like the others."""
        self.ensure()
        return secure_folder(self.device_dir(ident), base=self.path)

    # -- records ----------------------------------------------------------------------------------

    def record_path(self, ident: str) -> Path:
        if not ident or "/" in ident or ident.startswith("."):
            raise StateError(f"bad enrollment id {ident!r}")
        return self.devices / f"{ident}.json"

    def device_dir(self, ident: str) -> Path:
        return self.devices / f"{ident}.d"

    def save(self, record: dict) -> None:
        self.ensure()
        data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        atomic_write(self.record_path(record["id"]), data)

    def load(self, ident: str) -> dict | None:
        path = self.record_path(ident)
        if not self._check_trusted():
            return None
        try:
            text = read_file(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror}") from None
        try:
            record = json.loads(text)
        except ValueError as e:
            raise StateError(f"{path} is damaged ({e}); move it aside and run `dmsetup ls` to see what "
                             "blocktrack left in the kernel") from None
        if not isinstance(record, dict) or record.get("id") != ident:
            raise StateError(f"{path} does not hold the record of {ident}")
        return record

    def records(self) -> list[dict]:
        if not self._check_trusted():
            return []
        out = []
        for path in sorted(self.devices.glob("*.json")):
            record = self.load(path.stem)
            if record is not None:
                out.append(record)
        return out

    def remove(self, ident: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.record_path(ident).unlink()
        d = self.device_dir(ident)
        if is_folder(d):                      # a link is removed below, never followed into
            for f in d.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
            with contextlib.suppress(OSError):
                d.rmdir()
        else:
            with contextlib.suppress(FileNotFoundError):
                d.unlink()
        if is_folder(self.devices):
            fsync_dir(self.devices)

    # -- locking ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, ident: str, *, wait: bool = True):
        """Exclusive lock on one enrollment, released when the process dies (flock)."""
        self.ensure()
        path = self.locks / f"{ident}.lock"
        fd = open_file(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise StateError(f"another blocktrack process is working on {ident} (lock {path})") from None
            yield
        finally:
            os.close(fd)
