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
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from blocktrack.atomicfile import atomic_write, fsync_dir  # noqa: F401  (re-exported for the backends)
from blocktrack.errors import StateError

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

    def ensure(self) -> "StateDir":
        try:
            for d in (self.path, self.devices, self.locks):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(f"cannot create the state directory {self.path}: {e.strerror}") from None
        return self

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
        try:
            text = path.read_text()
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
        if not self.devices.is_dir():
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
        if d.is_dir():
            for f in d.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
            with contextlib.suppress(OSError):
                d.rmdir()
        if self.devices.is_dir():
            fsync_dir(self.devices)

    # -- locking ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, ident: str, *, wait: bool = True):
        """Exclusive lock on one enrollment, released when the process dies (flock)."""
        self.ensure()
        path = self.locks / f"{ident}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise StateError(f"another blocktrack process is working on {ident} (lock {path})") from None
            yield
        finally:
            os.close(fd)
