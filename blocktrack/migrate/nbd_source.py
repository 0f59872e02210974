"""The NBD backend as a TrackedSource: the migrating process serves the source to its writers.

``blocktrack migrate --backend nbd`` opens the source (an image file or a block device) as an NBD
export and serves it on a Unix socket (``--serve-socket``) with an in-process NbdServer. Writers —
a VM, a test, the demo's load generator — use that socket; every write is marked in the export's
DirtyMap after it lands and before it is acknowledged (nbd/export.py). Freezing is the server's
gate: new requests are read and held, and freeze() returns once none is in flight.

Surviving a killed sender: the intent journal. The dirty map lives in memory and dies with the
process, and writes made while no blocktrack process runs cannot happen (nobody serves the socket).
What remains is the window of writes between the last saved checkpoint and the kill. So every
change is first recorded in a journal file mapped MAP_SHARED — one 32-bit *generation* per chunk,
stored *before* the write is issued — which survives the process (its pages live in the page
cache). ``checkpoint()`` moves to a new generation and waits until every write that started under
an older one has finished (and so is in the DirtyMap); the saved token is that older generation.
A resumed run marks dirty every chunk whose journal generation is newer than the token. Stores
happen under one lock, so a chunk's generation never goes backwards. After a reboot the page cache
is gone, so a token from another boot makes everything dirty (start() says so).

Throttling (``--on-no-converge throttle``) delays the reply to each change, by a token bucket over
the chunk bytes it dirties: the change itself has landed and is marked, so lifting the throttle at
the freeze adds nothing to the final dirty set. Retiring makes every later change fail with EROFS (NBD_EPERM to
the client) without touching the device.

Journal file layout (little-endian)::

    0   8   magic b"BTJRNL1\\n"
    8   8   nchunks
    16  8   chunk size
    24  8   reserved, 0
    32  4*nchunks   u32 generation per chunk (0: never written through blocktrack)
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from blocktrack.directio import CHUNK_SIZE
from blocktrack.dirtymap import DirtyMap
from blocktrack.errors import UsageError
from blocktrack.migrate.savedstate import boot_id
from blocktrack.nbd.export import Export
from blocktrack.nbd.server import NbdServer
from blocktrack.safepath import open_file

JOURNAL_MAGIC = b"BTJRNL1\n"
_JOURNAL_HEAD = struct.Struct("<8sQQQ")


class IntentJournal:
    """One generation per chunk in a MAP_SHARED file; see the module docstring."""

    def __init__(self, path: Path, nchunks: int, chunk_size: int, *, fresh: bool):
        self.path = Path(path)
        self.nchunks = nchunks
        self.chunk_size = chunk_size
        self.reset = False  # True when an existing journal could not be used
        length = _JOURNAL_HEAD.size + 4 * max(nchunks, 1)
        head = _JOURNAL_HEAD.pack(JOURNAL_MAGIC, nchunks, chunk_size, 0)
        # Every open refuses a symbolic link (safepath.open_file); a new journal is made under a random
        # O_EXCL name and renamed into place, so a link planted anywhere in the folder is never written.
        if not fresh:
            try:
                with os.fdopen(open_file(self.path, os.O_RDONLY), "rb") as f:
                    ok = f.read(_JOURNAL_HEAD.size) == head and os.fstat(f.fileno()).st_size == length
            except FileNotFoundError:
                ok = False
            if not ok:
                fresh, self.reset = True, True
        if fresh:
            for stale in self.path.parent.glob(self.path.name + ".*.new"):   # left by a killed start
                stale.unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".new", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(head)
                    f.truncate(length)
                    os.fsync(f.fileno())
                os.rename(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        self._fd = open_file(self.path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._gens = memoryview(self._map)[_JOURNAL_HEAD.size:].cast("I")
        if sys.byteorder != "little":  # pragma: no cover - the file format is little-endian
            raise UsageError("the NBD intent journal needs a little-endian host")
        self._cond = threading.Condition()
        self._active: Counter = Counter()  # generation -> changes begun and not yet ended
        self.generation = max(self._gens[:nchunks], default=0) + 1

    def begin(self, offset: int, length: int) -> int:
        """Record that ``[offset, offset + length)`` is about to change; return its generation."""
        first = offset // self.chunk_size
        last = min((offset + max(length, 1) - 1) // self.chunk_size, self.nchunks - 1)
        with self._cond:
            gen = self.generation
            self._active[gen] += 1
            gens = self._gens
            for chunk in range(first, last + 1):
                gens[chunk] = gen
        return gen

    def end(self, gen: int) -> None:
        with self._cond:
            self._active[gen] -= 1
            if self._active[gen] <= 0:
                del self._active[gen]
                self._cond.notify_all()

    def advance(self) -> int:
        """Start a new generation; return the old one once every change begun under it has ended."""
        with self._cond:
            old = self.generation
            self.generation += 1
            self._cond.wait_for(lambda: not any(g <= old for g in self._active))
            return old

    def written_since(self, generation: int) -> DirtyMap:
        dirty = DirtyMap(self.nchunks, self.chunk_size)
        gens = self._gens
        for chunk in range(self.nchunks):
            if gens[chunk] > generation:
                dirty.mark(chunk)
        return dirty

    def close(self) -> None:
        if self._map is None:
            return
        self._gens.release()
        self._map.flush()
        self._map.close()
        os.close(self._fd)
        self._map = None


class WriteThrottle:
    """A token bucket over dirtied bytes; ``rate`` None lets everything through at once."""

    def __init__(self):
        self._cond = threading.Condition()
        self.rate: float | None = None
        self._allowance = 0.0
        self._last = time.monotonic()

    def set(self, rate: float | None) -> None:
        with self._cond:
            self.rate = rate
            self._allowance = 0.0
            self._last = time.monotonic()
            self._cond.notify_all()

    def wait(self, nbytes: int) -> None:
        with self._cond:
            while self.rate is not None:
                now = time.monotonic()
                self._allowance = min(self.rate * 0.25, self._allowance + (now - self._last) * self.rate)
                self._last = now
                if self._allowance >= 0:
                    self._allowance -= nbytes
                    return
                self._cond.wait(-self._allowance / self.rate)


class TrackingExport(Export):
    """An Export that journals each change before it starts, and can be throttled or retired."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.journal: IntentJournal | None = None
        self.throttle = WriteThrottle()
        self.retired = False

    def _begin(self, offset: int, length: int) -> int | None:
        if self.retired:
            raise OSError(errno.EROFS, "the source was retired after its migration: writes are refused")
        return self.journal.begin(offset, length) if self.journal is not None else None

    def _end(self, gen: int | None, offset: int, length: int) -> None:
        if gen is not None:
            self.journal.end(gen)
        # Throttle *after* the change landed and was marked, before the client hears of it: the
        # client waits, and a freeze (which lifts the throttle) never releases a change that was
        # not yet in the dirty set.
        chunk = self.dirty.chunk_size
        self.throttle.wait(((offset + max(length, 1) - 1) // chunk - offset // chunk + 1) * chunk)

    def write_from(self, view, offset, *, fua=False):
        gen = self._begin(offset, len(view))
        try:
            super().write_from(view, offset, fua=fua)
        finally:
            self._end(gen, offset, len(view))

    def trim(self, offset, length, *, fua=False):
        gen = self._begin(offset, length)
        try:
            super().trim(offset, length, fua=fua)
        finally:
            self._end(gen, offset, length)

    def write_zeroes(self, offset, length, *, fua=False, may_trim=True, fast=False):
        gen = self._begin(offset, length)
        try:
            super().write_zeroes(offset, length, fua=fua, may_trim=may_trim, fast=fast)
        finally:
            self._end(gen, offset, length)


class NbdSource:
    """TrackedSource over an in-process NBD server on a Unix socket (see the module docstring)."""

    backend = "nbd"

    def __init__(self, path: str, *, socket_path: str, folder: Path, chunk_size: int = CHUNK_SIZE,
                 workers: int = 4, on_event=None, socket_mode: int = 0o600, socket_gid: int | None = None):
        self.path = os.fspath(path)
        self.socket_path = os.fspath(socket_path)
        self.socket_mode = socket_mode      # the socket is created with it whatever the umask
        self.socket_gid = socket_gid
        self.folder = Path(folder)
        self.chunk_size = chunk_size
        self.workers = workers
        self.on_event = on_event
        self.export: TrackingExport | None = None
        self.server: NbdServer | None = None
        self.journal: IntentJournal | None = None
        self._thread: threading.Thread | None = None
        # Size now, before anything is opened for writing (the engine needs it for its handshake).
        probe = Export(self.path, read_only=True, direct=False)
        try:
            self.size = probe.size
        finally:
            probe.close()

    @property
    def nchunks(self) -> int:
        return -(-self.size // self.chunk_size)

    # -- TrackedSource --------------------------------------------------------------------------

    def start(self, resume_from: dict | None = None) -> tuple[DirtyMap, str | None]:
        """Open, journal and serve. Returns (chunks possibly written since ``resume_from``, note)."""
        dirty = DirtyMap(self.nchunks, self.chunk_size)
        self.export = TrackingExport(self.path, dirty=dirty, description=f"blocktrack migrate: {self.path}")
        try:
            if self.export.size != self.size:
                raise UsageError(f"{self.path} changed size while starting ({self.size} → {self.export.size})")
            since = DirtyMap(self.nchunks, self.chunk_size)
            note = None
            self.journal = IntentJournal(self.folder / "journal", self.nchunks, self.chunk_size,
                                         fresh=resume_from is None)
            if resume_from is not None:
                generation = resume_from.get("journal_generation")
                if self.journal.reset or generation is None:
                    since.mark_all()
                    note = "the NBD journal is missing or does not match: every chunk is treated as dirty"
                elif resume_from.get("boot_id") != boot_id():
                    since.mark_all()
                    note = ("the host restarted since the checkpoint, and the NBD journal lives in the page "
                            "cache: every chunk is treated as dirty")
                else:
                    since = self.journal.written_since(int(generation))
            self.export.journal = self.journal
            self.server = NbdServer(self.export, workers=self.workers, on_event=self.on_event)
            self.server.listen_unix(self.socket_path, mode=self.socket_mode, gid=self.socket_gid)
            self._thread = threading.Thread(target=self.server.serve_forever, name="nbd-serve", daemon=True)
            self._thread.start()
            if self.on_event is not None:
                self.on_event("serving", {"socket": self.socket_path, "path": self.path, "size": self.size,
                                          "uri": f"nbd+unix:///?socket={self.socket_path}",
                                          "direct_io": self.export.direct})
            return since, note
        except BaseException:
            self.close()
            raise

    def forget(self, first: int, count: int = 1) -> None:
        self.export.dirty.clear(first, count)

    def take_dirty(self) -> DirtyMap:
        return self.export.dirty.snapshot_and_clear()

    def dirty_count(self) -> int:
        return self.export.dirty.count()

    def checkpoint(self) -> dict:
        return {"journal_generation": self.journal.advance(), "boot_id": boot_id()}

    def freeze(self, timeout: float | None = None) -> bool:
        self.export.throttle.set(None)  # throttled writes must not stretch the downtime
        return self.server.freeze(timeout)

    def thaw(self) -> None:
        self.server.thaw()

    def throttle(self, bytes_per_second: float | None) -> bool:
        self.export.throttle.set(bytes_per_second)
        return True

    def held_writes(self) -> int:
        return self.server.gate.held if self.server is not None else 0

    def release(self, mode: str) -> dict:
        held = self.held_writes()
        if mode == "retire":
            self.export.retired = True
        elif mode != "thaw":
            raise ValueError(f"unknown release mode {mode!r}")
        self.server.thaw()
        return {"held_requests": held}

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            if self._thread is not None:
                self._thread.join()
            server.close()
        export, self.export = self.export, None
        if export is not None:
            try:
                if not export.read_only:
                    export.flush()
            finally:
                export.close()
        journal, self.journal = self.journal, None
        if journal is not None:
            journal.close()
