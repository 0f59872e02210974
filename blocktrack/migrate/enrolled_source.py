"""EnrolledSource: the migration engine's TrackedSource over an enrolled device (dm-era, dm-snapshot).

The kernel does the tracking here; each ``Backend.dirty_since`` call starts a new checkpoint and
answers for every write acknowledged since the previous one (backends/base.py). What this adapter
adds, and why:

* The engine reads the **hidden origin** (``/dev/mapper/blocktrack-<id>-orig``), not ``/dev/VG/LV``:
  at cutover the LV is suspended, and a read of a suspended dm device blocks until it resumes. The
  hidden device holds the same data (era and snapshot-origin pass every write straight to it), and
  O_DIRECT reads of it see each write once it has been acknowledged to the writer.
* The engine asks ``dirty_count`` ten times a second, from its send loop, for its progress line and
  its pending estimate, but a pass is not free (era: a metadata snapshot and a suspend/resume;
  snapshot: a new snapshot; a third of a second each under the lab's emulation). Called inline, the
  passes slowed the bulk copy and, counted as link busy time, made the measured link rate a fraction
  of the real one (seen in the lab: 0.9 MB/s measured on an 8 MiB/s link, and every cutover
  aborted). So a refresher thread takes a pass every ``REFRESH_S`` seconds into ``pending`` (chunks
  the kernel reported that the engine has not taken yet), ``dirty_count`` only counts it, and
  ``take_dirty`` hands over ``pending`` plus a fresh pass. Nothing reported by the kernel is
  dropped: it is either in ``pending`` or already with the engine. The refresher pauses while the
  source is frozen (the cutover takes its own pass).
* ``forget(i)`` (the bulk pass is about to read chunk i) clears i from ``pending`` only: every write
  in ``pending`` happened before the checkpoint that reported it, so the bulk read that follows sees
  it; writes after that checkpoint are still in the kernel's record.
* Checkpoint tokens name the enrollment (id and time) as well as the checkpoint number: after an
  unenroll and a new enroll, numbers start again at 1 and an old token would answer for the wrong
  interval, so a token from another enrollment means "every chunk is dirty", never "nothing".

The device stays enrolled when the migration ends (tracking goes on, a later --resume needs it);
``blocktrack unenroll`` stops it. After a verified cutover the LV stays suspended (the kernel holds
its writes, even if this process dies) until ``release``: thaw resumes it, retire replaces its table
with an error target, so every held and later write fails and the source never changes again.
"""

from __future__ import annotations

import threading
import warnings

from blocktrack import backends
from blocktrack.dirtymap import DirtyMap
from blocktrack.errors import AllDirtyWarning, NotEnrolled, UsageError
from blocktrack.kernel import dm
from blocktrack.state import StateDir

REFRESH_S = 1.0


def _merge(into: DirtyMap, other: DirtyMap) -> None:
    for first, last in other.ranges():
        into.mark(first, last - first + 1)


class EnrolledSource:
    """TrackedSource over a device enrolled with a kernel backend (see the module docstring)."""

    def __init__(self, device: str, backend: str, state: StateDir | None, *, enroll_options: dict | None = None,
                 on_event=None, tracker=None):
        self.device = device
        self.backend = backend
        self.state = state
        self.enroll_options = enroll_options or {}
        self.on_event = on_event
        self.tracker: backends.Backend | None = None
        self.enrolled_now = False
        self.pending: DirtyMap | None = None
        self._lock = threading.Lock()            # pending and every call into the tracker
        self._stop = threading.Event()
        self._frozen = False
        self._refresher: threading.Thread | None = None
        self.refresh_error: BaseException | None = None
        if tracker is None:
            self._attach()
        else:
            self._bind(tracker)

    @classmethod
    def around(cls, tracker, backend: str, *, on_event=None) -> "EnrolledSource":
        """A source over a backend already opened (a test's stand-in tracker, say)."""
        return cls(tracker.record.get("device", "?"), backend, None, on_event=on_event, tracker=tracker)

    # -- setup -------------------------------------------------------------------------------------

    def _attach(self) -> None:
        """Enroll (or find the enrollment of) the device, so that size and path are known before the
        engine's handshake."""
        try:
            tracker = backends.open_backend(self.device, self.state)
        except NotEnrolled:
            tracker = None
        if tracker is not None and tracker.name != self.backend:
            raise UsageError(f"{self.device} is enrolled with the {tracker.name} backend, not {self.backend}: "
                             f"use --backend {tracker.name}, or unenroll it first")
        if tracker is None or tracker.tracking_state()[0] == "detached":
            tracker, event = backends.enroll(self.device, self.backend, self.state, **self.enroll_options)
            self.enrolled_now = event == "enrolled"
            if self.on_event is not None:
                self.on_event("enrolled", {"device": self.device, "backend": self.backend, "event": event,
                                           "checkpoint": tracker.checkpoint})
        self._bind(tracker)

    def _bind(self, tracker) -> None:
        tracker.require_tracking()
        self.tracker = tracker
        self.size = tracker.size
        self.chunk_size = tracker.chunk_size
        self.path = f"/dev/mapper/{tracker.record['hidden']['origin']}"
        self.pending = DirtyMap.for_size(self.size, self.chunk_size)

    def _token_matches(self, token: dict) -> bool:
        r = self.tracker.record
        return (token.get("enrollment") == r["id"] and token.get("enrolled_at") == r["enrolled_at"]
                and isinstance(token.get("checkpoint"), int)
                and r["first_checkpoint"] <= token["checkpoint"] <= r["checkpoint"])

    # -- TrackedSource -----------------------------------------------------------------------------

    def start(self, resume_from: dict | None = None) -> tuple[DirtyMap, str | None]:
        since = DirtyMap.for_size(self.size, self.chunk_size)
        note = None
        if self.tracker.tracking_state()[0] in ("frozen", "suspended"):
            # A migrate killed during its cutover (or a verified one given up with --restart) left the
            # device suspended: nothing else will resume it, and its writers hang until someone does.
            self.tracker.thaw()
            note = f"{self.device} was left frozen by an earlier migration: thawed it"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AllDirtyWarning)
            if resume_from is None:
                self.tracker.dirty_since()             # a new checkpoint: the bulk pass copies the rest
            elif self._token_matches(resume_from):
                since, _ = self.tracker.dirty_since(resume_from["checkpoint"])
            else:
                since.mark_all()
                note = "; ".join(filter(None, [note, f"{self.device} was enrolled again since the saved "
                                                    "checkpoint (or the checkpoint is unknown): every chunk is "
                                                    "treated as dirty"]))
        notes = [str(w.message) for w in caught if issubclass(w.category, AllDirtyWarning)]
        if notes:
            note = "; ".join(([note] if note else []) + notes)
        self._refresher = threading.Thread(target=self._refresh_loop, name="dirty-refresh", daemon=True)
        self._refresher.start()
        return since, note

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_S):
            with self._lock:
                if self._frozen or self._stop.is_set():
                    continue
                try:
                    self._pass_into_pending()
                except BaseException as exc:       # the engine's next take_dirty raises it again
                    self.refresh_error = exc
                    return

    def _pass_into_pending(self) -> None:
        """One pass of the tracker into ``pending``; the caller holds ``_lock``."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AllDirtyWarning)
            fresh, _checkpoint = self.tracker.dirty_since()
        for w in caught:
            if self.on_event is not None and issubclass(w.category, AllDirtyWarning):
                self.on_event("warning", {"message": str(w.message)})
        _merge(self.pending, fresh)

    def forget(self, first: int, count: int = 1) -> None:
        with self._lock:
            self.pending.clear(first, count)

    def take_dirty(self) -> DirtyMap:
        with self._lock:
            self._pass_into_pending()
            taken, self.pending = self.pending, DirtyMap.for_size(self.size, self.chunk_size)
            return taken

    def dirty_count(self) -> int:
        if self.refresh_error is not None:
            raise self.refresh_error
        with self._lock:
            return self.pending.count()

    def checkpoint(self) -> dict:
        """Writes before the tracker's latest checkpoint are in ``pending`` or with the engine; the
        engine calls take_dirty right after this, which moves them into what it saves as owed."""
        with self._lock:
            self.tracker.reload()
            r = self.tracker.record
            return {"backend": self.backend, "enrollment": r["id"], "enrolled_at": r["enrolled_at"],
                    "checkpoint": r["checkpoint"]}

    def freeze(self, timeout: float | None = None) -> bool:
        with self._lock:
            self._frozen = True
            self.tracker.freeze()      # dm suspend with the filesystem frozen: waits for writes in flight
        return True

    def thaw(self) -> None:
        with self._lock:
            self.tracker.thaw()
            self._frozen = False

    def throttle(self, bytes_per_second: float | None) -> bool:
        return False                   # the kernel backends cannot slow writers down

    def held_writes(self) -> int:
        return 0                       # a suspended dm device does not say how many bios it holds

    def release(self, mode: str) -> dict:
        with self._lock:
            return release_enrolled(self.tracker, mode)

    def close(self) -> None:
        """Stop the refresher; tracking itself stays (see the module docstring)."""
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()


def release_enrolled(tracker: backends.Backend, mode: str) -> dict:
    """End the freeze after a verified cutover: thaw, or retire (an error table, then resume)."""
    if mode == "thaw":
        tracker.thaw()
        return {"held_requests": None}
    if mode != "retire":
        raise ValueError(f"unknown release mode {mode!r}")
    dev = tracker.current_device()
    if dev is None:
        raise UsageError(f"{tracker.device} is gone")
    sectors = tracker.size // 512
    dm.load(dev.name, f"0 {sectors} error\n")
    dm.resume(dev.name)                # the error table takes over: held bios fail with EIO
    tracker.reload()
    tracker.record["frozen"] = False
    tracker.record["retired"] = True
    tracker.save()
    return {"held_requests": None}
