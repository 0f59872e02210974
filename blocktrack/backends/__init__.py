"""Tracking backends: which chunks of a live device were written, through one small interface
(``base.Backend``: attach, dirty_since, freeze/thaw, detach, status).

``era`` (dm-era), ``snapshot`` (dm-snapshot) and ``nbd`` (blocktrack's NBD server under the kernel's
NBD client) live here. The functions below are what the CLI and the migration code call: they find the backend
of an enrolled device from its record in the state directory.
"""

from __future__ import annotations

from blocktrack.backends.base import Backend, Target, find_record, interruptible, resolve_target
from blocktrack.backends.era import EraBackend
from blocktrack.backends.nbd import NbdBackend
from blocktrack.backends.snapshot import SnapshotBackend
from blocktrack.errors import AlreadyEnrolled, StateError, UsageError
from blocktrack.kernel import dm
from blocktrack.state import StateDir

BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (EraBackend, SnapshotBackend, NbdBackend)}

__all__ = ["BACKENDS", "Backend", "Target", "enroll", "open_backend", "unenroll", "enrolled", "orphans",
           "interruptible"]


def _backend_for(state: StateDir, record: dict) -> Backend:
    cls = BACKENDS.get(record.get("backend"))
    if cls is None:
        raise StateError(f"the record of {record.get('device')} names an unknown backend {record.get('backend')!r}")
    return cls(state, record)


def enroll(device: str, backend: str, state: StateDir, **options) -> tuple[Backend, str]:
    """Start tracking ``device``. Returns (backend, what happened: "enrolled" | "reattached" |
    "already enrolled"). A device enrolled before whose dm devices are gone (a reboot) is re-attached
    with what its metadata recorded."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    target = resolve_target(device)
    state.ensure()
    with state.lock(target.ident):
        record = state.load(target.ident)
        if record is not None:
            existing = _backend_for(state, record)
            if record["backend"] != backend:
                raise AlreadyEnrolled(f"{target.display} is enrolled with the {record['backend']} backend: "
                                      "unenroll it first to change backends")
            condition, _dev = existing.tracking_state()
            if condition in ("tracking", "frozen", "suspended"):
                return existing, "already enrolled"
            if condition == "detached":
                existing.reattach(target)
                return existing, "reattached"
            existing.require_tracking()          # raises with the right advice
        return BACKENDS[backend].attach(state, target, options), "enrolled"


def open_backend(device: str, state: StateDir) -> Backend:
    """The backend of an enrolled device (named by path or enrollment id)."""
    return _backend_for(state, find_record(state, device))


def unenroll(device: str, state: StateDir) -> tuple[dict, list[str]]:
    record = find_record(state, device)
    backend = _backend_for(state, record)
    return record, backend.detach()


def enrolled(state: StateDir) -> list[Backend]:
    return [_backend_for(state, record) for record in state.records()]


def orphans(state: StateDir) -> list[dm.DmDevice]:
    """blocktrack devices in the kernel that no record accounts for (a crash before the record was written)."""
    if dm.dm_major() is None:
        return []
    known = {r["id"] for r in state.records()}
    out = []
    for dev in dm.list_devices():
        if dev.is_ours:
            ident = dev.uuid[len(dm.UUID_PREFIX):].rsplit("-", 1)[0]
            if ident not in known:
                out.append(dev)
    return out
