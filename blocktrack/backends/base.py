"""The tracking-backend interface, and what every backend shares: the device it tracks, its record in the
state directory, the undo stack, fault points for tests.

The interface (one small set of calls, like an nbdkit plugin's callbacks; the migration code never asks
which backend it has)::

    backend = SomeBackend.attach(state, target, options)    # enroll: start tracking, live
    dirty, checkpoint = backend.dirty_since(since=None)      # chunks written since a checkpoint;
                                                             # every call starts a new checkpoint
    backend.freeze(); backend.thaw()                         # hold / release writes (cutover)
    backend.detach()                                         # unenroll: the device exactly as before
    backend.status()                                         # a JSON-able dict

Checkpoints are integers that only grow. ``dirty_since(c)`` answers for every write acknowledged after
checkpoint ``c`` was returned (never fewer: a backend that lost track answers "everything", with an
``AllDirtyWarning``, or raises ``TrackingError``); ``since=None`` means the checkpoint the previous call
returned. A backend keeps no state in memory between calls: each CLI process rebuilds it from the
record (``open``), so tracking survives a restart of blocktrack; the kernel does the tracking.

Kernel changes are made inside an ``UndoStack``: each step pushes its inverse, and an exception (or
Ctrl-C) unwinds them in reverse order, so a failed enroll leaves the device as it was. The record is
written before the kernel changes it describes, with a ``phase``, so a process killed half-way leaves
enough for ``unenroll`` to finish the job.

Record fields (JSON, state/devices/<id>.json): ``format``, ``id``, ``backend``, ``phase`` (enrolling |
enrolled), ``device`` (the path users know), ``dm_name``, ``dm_uuid``, ``lv`` ({vg, name, uuid} or null),
``size``, ``chunk_size``, ``nchunks``, ``original_table`` (as dmsetup printed it), ``tracking_table``,
``hidden`` ({role: dm name}), ``created_lvs`` ([{vg, name}]), ``first_checkpoint``, ``checkpoint``,
``enrolled_at``, ``updated_at``, and a section named after the backend.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from blocktrack.dirtymap import DirtyMap
from blocktrack.errors import (AllDirtyWarning, AlreadyEnrolled, BlocktrackError, DeviceError, FaultInjected,
                               NotEnrolled, StateError, TrackingError, UsageError)
from blocktrack.kernel import dm, lvm
from blocktrack.kernel.blockdev import device_size
from blocktrack.state import StateDir

RECORD_FORMAT = 1
CHUNK_SIZE = 1 << 20
SECTOR = 512
#: Targets that stack on other devices: blocktrack enrolls only devices that run none of them.
STACKING_TARGETS = ("era", "snapshot-origin", "snapshot", "snapshot-merge", "thin", "thin-pool", "cache",
                    "writecache", "raid", "mirror")


# -- fault points (tests) ----------------------------------------------------------------------------

def fault_point(name: str) -> None:
    """Misbehave here when ``BLOCKTRACK_FAULT`` names this point: ``POINT`` or ``POINT=fail`` raises
    FaultInjected, ``POINT=kill`` sends SIGKILL to this process, ``POINT=pause`` creates
    ``$BLOCKTRACK_FAULT_DIR/POINT.paused`` and waits until ``POINT.resume`` exists there. Several points
    may be given, comma-separated."""
    spec = os.environ.get("BLOCKTRACK_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        point, _, action = item.strip().partition("=")
        if point != name:
            continue
        action = action or "fail"
        if action == "fail":
            raise FaultInjected(f"fault injected at {name}")
        if action == "kill":
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "pause":
            folder = Path(os.environ.get("BLOCKTRACK_FAULT_DIR", "/tmp"))
            (folder / f"{name}.paused").touch()
            deadline = time.monotonic() + 600
            while not (folder / f"{name}.resume").exists():
                if time.monotonic() > deadline:
                    raise FaultInjected(f"paused at {name} for too long")
                time.sleep(0.05)
            return
        raise UsageError(f"BLOCKTRACK_FAULT: unknown action {action!r} for {name}")


# -- undo stack --------------------------------------------------------------------------------------

class UndoStack:
    """Collects the inverse of each kernel change; on an exception, runs them newest first.

    ``with UndoStack("enroll /dev/vg/lv") as undo: ...; undo.push("remove X", fn)``. Leaving the block
    normally forgets the steps (the change is kept). If an undo step fails too, the error says so and
    names what is left, so an operator can finish by hand.
    """

    def __init__(self, what: str):
        self.what = what
        self.steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, description: str, fn: Callable[[], object]) -> None:
        self.steps.append((description, fn))

    def __enter__(self) -> "UndoStack":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.steps.clear()
            return False
        failures = []
        while self.steps:
            description, fn = self.steps.pop()
            try:
                fn()
            except BaseException as undo_exc:          # keep unwinding: leave as little behind as we can
                failures.append(f"{description}: {undo_exc}")
        if failures:
            left = "; ".join(failures)
            raise DeviceError(f"{self.what} failed ({exc}), and undoing it failed too: {left}") from exc
        return False


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def interruptible() -> None:
    """Make SIGTERM unwind like Ctrl-C (so undo stacks run) in a command that changes kernel state."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


# -- the device being tracked ------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A device to enroll: its dm identity, its LV (if it is one), its size."""

    path: str
    dev: dm.DmDevice
    lv: lvm.LogicalVolume | None
    size: int

    @property
    def ident(self) -> str:
        return ident_for(self.dev.uuid, self.dev.name)

    @property
    def display(self) -> str:
        return f"/dev/{self.lv.vg}/{self.lv.name}" if self.lv else f"/dev/mapper/{self.dev.name}"


def ident_for(dm_uuid: str, dm_name: str) -> str:
    """The enrollment id: an LV's UUID (32 characters, stable across renames), else a hash of the dm
    UUID or name."""
    if lvm.is_lvm_uuid(dm_uuid) and len(dm_uuid) >= 4 + 64:
        return dm_uuid[4 + 32:4 + 64]
    return "dm" + hashlib.sha256((dm_uuid or "name:" + dm_name).encode()).hexdigest()[:16]


def resolve_target(path: str) -> Target:
    dev = dm.device_for_path(path)
    if dev.is_ours:
        raise UsageError(f"{path} is one of blocktrack's own hidden devices ({dev.name}); enroll the LV itself")
    lv = lvm.lv_for_dm(dev.name, dev.uuid)
    if lvm.is_lvm_uuid(dev.uuid) and lv is None:
        raise UsageError(f"{path} ({dev.name}) is an internal LVM layer, not a logical volume")
    return Target(path=path, dev=dev, lv=lv, size=device_size(dev.node))


def find_record(state: StateDir, device: str) -> dict:
    """The record of an enrolled device, named by path (/dev/VG/LV, /dev/mapper/NAME) or by its id."""
    record = None
    if "/" not in device:
        record = state.load(device)
    if record is None and os.path.exists(device):
        try:
            dev = dm.device_for_path(device)
        except UsageError:
            dev = None
        if dev is not None:
            record = state.load(ident_for(dev.uuid, dev.name))
    if record is None:
        for candidate in state.records():
            if device in (candidate.get("device"), candidate.get("dm_name"), f"/dev/mapper/{candidate.get('dm_name')}"):
                record = candidate
                break
    if record is None:
        raise NotEnrolled(f"{device} is not enrolled (blocktrack status lists what is)")
    return record


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def union_into(result: DirtyMap, other: DirtyMap) -> None:
    for first, last in other.ranges():
        result.mark(first, last - first + 1)


def mark_sorted_chunks(dirty: DirtyMap, chunks) -> None:
    """Mark an ascending sequence of chunk numbers, a run at a time."""
    run_start = prev = None
    for c in chunks:
        if prev is not None and c == prev + 1:
            prev = c
            continue
        if run_start is not None:
            dirty.mark(run_start, prev - run_start + 1)
        run_start = prev = c
    if run_start is not None:
        dirty.mark(run_start, prev - run_start + 1)


def all_dirty(record: dict, reason: str) -> DirtyMap:
    warnings.warn(AllDirtyWarning(f"{record['device']}: {reason}: reporting every chunk as dirty"), stacklevel=3)
    dirty = DirtyMap.for_size(record["size"], record["chunk_size"])
    dirty.mark_all()
    return dirty


# -- the interface ------------------------------------------------------------------------------------

class Backend(ABC):
    """A tracking backend bound to one enrolled device (see the module docstring)."""

    name: ClassVar[str]

    def __init__(self, state: StateDir, record: dict):
        self.state = state
        self.record = record

    # -- identity ------------------------------------------------------------------------------------

    @property
    def ident(self) -> str:
        return self.record["id"]

    @property
    def device(self) -> str:
        return self.record["device"]

    @property
    def chunk_size(self) -> int:
        return self.record["chunk_size"]

    @property
    def nchunks(self) -> int:
        return self.record["nchunks"]

    @property
    def size(self) -> int:
        return self.record["size"]

    @property
    def checkpoint(self) -> int:
        return self.record["checkpoint"]

    # -- the calls ------------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def attach(cls, state: StateDir, target: Target, options: dict) -> "Backend":
        """Start tracking ``target`` live; return the backend, its first checkpoint in ``checkpoint``."""

    def reattach(self, target: Target) -> None:
        """Tracking state survived (in the kernel's metadata) but the dm devices did not (a reboot):
        rebuild them around ``target`` without losing what was recorded. Backends whose tracking does
        not survive (an in-memory map) keep this refusal."""
        raise TrackingError(f"{self.device}: the {self.name} backend cannot re-attach after a restart: "
                            "unenroll, enroll again and copy the device whole")

    @abstractmethod
    def dirty_since(self, since: int | None = None) -> tuple[DirtyMap, int]:
        """(chunks written since checkpoint ``since``, the new checkpoint this call starts)."""

    def freeze(self) -> None:
        """Hold every new write and wait for those in flight: dm suspend with the filesystem frozen
        (its dirty data written first). A pass while frozen answers for every write made before."""
        with self.state.lock(self.ident):
            self.reload()
            dev = self.require_tracking()
            self.record["frozen"] = True
            self.save()
            if not dev.suspended:
                dm.suspend(dev.name, lockfs=True)
            self.after_suspend()

    def after_suspend(self) -> None:
        """A backend with writes in flight outside device-mapper holds them here (under the lock)."""

    def thaw(self) -> None:
        """Let writes through again (also resumes a device an interrupted pass left suspended)."""
        with self.state.lock(self.ident):
            self.reload()
            dev = self.require_tracking()
            if dev.suspended:
                dm.resume(dev.name)
            self.record["frozen"] = False
            self.save()

    @abstractmethod
    def detach(self) -> list[str]:
        """Stop tracking: put the device's original table back byte for byte, remove what we made.
        Returns notes on what was done."""

    @abstractmethod
    def status(self) -> dict:
        """What ``blocktrack status --json`` shows for this device."""

    # -- shared machinery -----------------------------------------------------------------------------

    @classmethod
    def new_record(cls, target: Target, original_table: str) -> dict:
        nchunks = -(-target.size // CHUNK_SIZE)
        return {
            "format": RECORD_FORMAT, "id": target.ident, "backend": cls.name, "phase": "enrolling",
            "device": target.display, "dm_name": target.dev.name, "dm_uuid": target.dev.uuid,
            "lv": ({"vg": target.lv.vg, "name": target.lv.name, "uuid": target.lv.uuid} if target.lv else None),
            "size": target.size, "chunk_size": CHUNK_SIZE, "nchunks": nchunks,
            "original_table": original_table, "tracking_table": None, "hidden": {}, "created_lvs": [],
            "first_checkpoint": None, "checkpoint": None, "enrolled_at": now_iso(), "updated_at": now_iso(),
            cls.name: {},
        }

    def save(self) -> None:
        self.record["updated_at"] = now_iso()
        self.state.save(self.record)

    def reload(self) -> None:
        record = self.state.load(self.ident)
        if record is None:
            raise NotEnrolled(f"{self.device} is no longer enrolled")
        self.record = record

    def current_device(self) -> dm.DmDevice | None:
        """The tracked device now, found by its dm UUID (its name may have changed), else by name."""
        uuid = self.record.get("dm_uuid")
        if uuid:
            return dm.find_by_uuid(uuid)
        return dm.info(self.record["dm_name"])

    def tracking_state(self) -> tuple[str, dm.DmDevice | None]:
        """("tracking" | "frozen" | "suspended" | "detached" | "lost" | "missing" | "enrolling", the device).

        detached: the device runs its original table and our hidden device is gone -- what a reboot
        leaves; ``enroll`` again re-attaches without losing what was recorded. lost: someone loaded a
        different table (an LVM refresh, say): writes bypass tracking.
        """
        if self.record.get("phase") != "enrolled":
            return "enrolling", self.current_device()
        dev = self.current_device()
        if dev is None:
            return "missing", None
        if self.record.get("retired"):
            return "retired", dev        # `release --retire` after a migration: an error table, on purpose
        live = dm.table(dev.name)
        hidden_present = dm.info(self.record["hidden"]["origin"]) is not None
        if live == self.record["tracking_table"] and hidden_present:
            if not dev.suspended:
                return "tracking", dev
            # Suspended by freeze(), or left suspended by a pass killed between suspend and resume (or
            # by someone else): tracking is intact either way; "suspended" tells the operator to resume.
            return ("frozen" if self.record.get("frozen") else "suspended"), dev
        if not hidden_present and not any(line.target in STACKING_TARGETS for line in dm.parse_table(live)):
            return "detached", dev
        return "lost", dev

    def require_tracking(self) -> dm.DmDevice:
        state, dev = self.tracking_state()
        if state in ("tracking", "frozen", "suspended"):
            return dev
        hints = {
            "enrolling": "an enroll was interrupted: run `blocktrack unenroll` and enroll again",
            "retired": "it was retired after a migration (an error table fails every write): `blocktrack "
                       "unenroll` removes blocktrack's devices and leaves the error table",
            "missing": "the device is gone",
            "detached": "tracking is not attached (after a reboot?): run `blocktrack enroll "
                        f"{self.device}` to re-attach it",
            "lost": "its device-mapper table was replaced behind blocktrack's back (an LVM refresh or "
                    "resize?), so writes bypassed tracking: unenroll, enroll again and copy it whole",
        }
        raise TrackingError(f"{self.device}: {hints[state]}")

    def swap_in_tracking_table(self, dev_name: str, tracking: str, original: str, undo: UndoStack) -> None:
        """Make ``tracking`` the device's live table: recorded first, loaded (the target's constructor runs
        here and may refuse), then one suspend/resume without a filesystem freeze -- writes in flight
        finish on the old table, which maps the same blocks as the hidden device under the new one."""
        self.record["tracking_table"] = tracking
        self.save()
        dm.load(dev_name, tracking)
        undo.push(f"restore the table of {dev_name}", lambda: dm.restore_table(dev_name, original))
        fault_point("enroll.after-load")
        dm.suspend(dev_name, lockfs=False)
        fault_point("enroll.after-suspend")
        dm.resume(dev_name)
        fault_point("enroll.after-resume")
        if dm.table(dev_name) != tracking:
            raise DeviceError(f"{dev_name}: the table in force after the swap is not the one loaded")

    def validate_since(self, since: int | None) -> int:
        if since is None:
            return self.record["checkpoint"]
        first, last = self.record["first_checkpoint"], self.record["checkpoint"]
        if since < first:
            raise UsageError(f"checkpoint {since} is older than the enrollment of {self.device} (its first "
                             f"checkpoint is {first}): writes before it were not tracked")
        if since > last:
            raise UsageError(f"checkpoint {since} of {self.device} has not been issued yet (the latest is {last})")
        return since

    def teardown(self) -> list[str]:
        """Undo everything the record says we made, from any state (enrolling, tracking, frozen, after a
        reboot, half-removed). Returns notes on what was found; raises when something could not be
        removed (the record is kept so that a second ``unenroll`` can finish)."""
        notes: list[str] = []
        errors: list[str] = []
        dev = self.current_device()
        original = self.record["original_table"]
        if dev is None:
            notes.append(f"{self.device} no longer exists")
        else:
            try:
                live = dm.table(dev.name)
                ours = self.record.get("tracking_table")
                if dev.inactive_table or dev.suspended or live != original:
                    if live != original and live != ours and not _runs_on_our_devices(live, self.ident):
                        notes.append(f"{dev.name} runs a table blocktrack did not load; left as it is")
                        if dev.inactive_table:
                            dm.clear(dev.name)
                        if dev.suspended:
                            dm.resume(dev.name)
                    elif dm.restore_table(dev.name, original):
                        notes.append(f"restored the original table of {dev.name}")
            except BlocktrackError as exc:
                errors.append(f"restore the table of {dev.name}: {exc}")
        if not errors:
            # Ours, snapshots first (they hold the hidden origin open), the hidden origin last.
            for ours in sorted(dm.devices_of(self.ident), key=lambda d: d.uuid.endswith("-orig")):
                try:
                    dm.remove(ours.name)
                    notes.append(f"removed {ours.name}")
                except BlocktrackError as exc:
                    errors.append(f"remove {ours.name}: {exc}")
        if not errors:
            for lv in self.record.get("created_lvs", []):
                try:
                    if lvm.remove_lv(lv["vg"], lv["name"]):
                        notes.append(f"removed {lv['vg']}/{lv['name']}")
                except BlocktrackError as exc:
                    errors.append(f"remove {lv['vg']}/{lv['name']}: {exc}")
        if errors:
            raise DeviceError(f"unenroll {self.device}: " + "; ".join(errors))
        self.state.remove(self.ident)
        return notes

    def base_status(self) -> dict:
        state, dev = self.tracking_state()
        r = self.record
        return {
            "device": r["device"], "id": r["id"], "backend": r["backend"], "state": state,
            "dm_name": dev.name if dev else r["dm_name"],
            "size": r["size"], "chunk_size": r["chunk_size"], "chunks": r["nchunks"],
            "checkpoint": r["checkpoint"], "first_checkpoint": r["first_checkpoint"],
            "hidden_devices": sorted(d.name for d in dm.devices_of(r["id"])),
            "helper_volumes": [f"{lv['vg']}/{lv['name']}" for lv in r.get("created_lvs", [])],
            "enrolled_at": r["enrolled_at"], "dirty": None,
        }


def _runs_on_our_devices(table_text: str, ident: str) -> bool:
    """True when a table refers to one of our devices (a half-finished enroll left it)."""
    ours = {d.devno for d in dm.devices_of(ident)}
    return any(word in ours for line in dm.parse_table(table_text) for word in line.args.split())


def check_enrollable(target: Target, state: StateDir) -> str:
    """The device's current table, after checking that it can be enrolled now."""
    dev = dm.info(target.dev.name)
    if dev is None:
        raise UsageError(f"{target.path}: the device went away")
    if not dev.live_table:
        raise UsageError(f"{target.path} has no live table")
    if dev.suspended:
        raise UsageError(f"{target.path} is suspended: resume it first")
    if dev.inactive_table:
        raise UsageError(f"{target.path} has an inactive table loaded (another tool is changing it): "
                         "try again when it is done, or `dmsetup clear` it")
    table_text = dm.table(dev.name)
    lines = dm.parse_table(table_text)
    for line in lines:
        if line.target in STACKING_TARGETS:
            raise AlreadyEnrolled(f"{target.path} runs a {line.target} target: blocktrack stacks only on "
                                  "plain linear or striped volumes")
    if lines[0].start != 0 or sum(line.length for line in lines) * SECTOR != target.size:
        raise UsageError(f"{target.path}: its table does not cover the device exactly")
    leftovers = dm.devices_of(target.ident)
    if leftovers:
        raise AlreadyEnrolled(f"{target.path}: blocktrack devices from an earlier enrollment are still there "
                              f"({', '.join(d.name for d in leftovers)}): run `blocktrack unenroll {target.path}`")
    return table_text


def lv_device_path(lv: dict) -> str:
    return f"/dev/{lv['vg']}/{lv['name']}"


def state_error_if_unknown(backend_name: str, known) -> None:
    if backend_name not in known:
        raise StateError(f"the state directory names an unknown backend {backend_name!r}")
