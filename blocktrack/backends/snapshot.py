"""The snapshot backend: a dm snapshot of the enrolled device is the checkpoint; its COW exception table
lists every chunk written since.

Stack after enrollment (the device keeps its name and dm UUID)::

    VG-LV                          snapshot-origin <hidden>                   (our table in the LV)
    blocktrack-<id>-orig           <the LV's original table>
    blocktrack-<id>-snap<G>        snapshot <hidden> <cow slot> P <chunk>     (checkpoint G)
    VG-blocktrack_LV_cow0, _cow1   linear                                     (two COW volumes we create)

Why raw dm snapshots and not ``lvcreate -s``: LVM would rebuild the LV's table from its own metadata
(snapshot-origin over an LVM ``-real`` layer) and drop our layer; the COW volumes are ordinary LVs, the
snapshot devices ours.

A pass (``dirty_since``), from checkpoint G (snapshot ``snapG`` on COW slot s):

1. zero the header of the other slot, create ``snap<G+1>`` on it with no table, load its table;
2. suspend the LV (snapshot-origin; no filesystem freeze): waits for every write in flight, including
   those waiting for a chunk copy; resume ``snap<G+1>`` (it starts taking exceptions); resume the LV.
   Every write acknowledged before the suspend completed is in ``snapG``'s table on disk; every write
   after the resume is caught by ``snap<G+1>``;
3. remove ``snapG`` (no more exceptions are added; the table stays on its COW volume) and read its
   table from the COW with O_DIRECT (snapshot_cow.py says why that is complete); an invalidated
   (overflowed) snapshot means every chunk is dirty, with a warning;
4. save what changed between G and G+1 as ``devices/<id>.d/interval-<G>.dmap`` (kept for ``--since``
   an older checkpoint), then the record with checkpoint G+1.

A process killed anywhere leaves a state the next pass recognises: a stale ``snap<G+1>`` next to a live
``snapG`` is removed (``snapG`` still holds everything); ``snap<G+1>`` alone means the pass got past
step 3, and it is completed from ``snapG``'s COW volume, which is only reused one pass later.
"""

from __future__ import annotations

import mmap
import os
import re

from blocktrack.backends.base import (SECTOR, Backend, Target, UndoStack, all_dirty, check_enrollable, fault_point,
                                      lv_device_path, union_into)
from blocktrack.dirtymap import DirtyMap, DirtyMapFileError
from blocktrack.errors import BlocktrackError, DeviceError, MetadataError, TrackingError, UsageError, check
from blocktrack.kernel import dm, lvm
from blocktrack.kernel.snapshot_cow import CowDevice, mark_exceptions
from blocktrack.state import StateDir

MIB = 1 << 20
DEFAULT_CHUNK_KIB = 64
KEEP_INTERVALS = 64
_SNAP_RE = re.compile(r"-snap(\d+)$")


def default_cow_size(size: int) -> int:
    """Room for what may change between two passes: a fifth of the device, at least 8 MiB."""
    return max(8 * MIB, size // 5)


class SnapshotBackend(Backend):
    name = "snapshot"

    @property
    def snap(self) -> dict:
        return self.record["snapshot"]

    def _snap_name(self, generation: int) -> str:
        return dm.hidden_name(self.ident, f"snap{generation}")

    def _snap_table(self, hidden_devno: str, cow_path: str) -> str:
        st = os.stat(cow_path)
        cow_devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return (f"0 {self.size // SECTOR} snapshot {hidden_devno} {cow_devno} P "
                f"{self.snap['chunk_sectors']}\n")

    def _cow_path(self, slot: int) -> str:
        return self.snap["cow"][slot]["path"]

    # -- attach --------------------------------------------------------------------------------------

    @classmethod
    def attach(cls, state: StateDir, target: Target, options: dict) -> "SnapshotBackend":
        if target.lv is None:
            raise UsageError(f"{target.path} is not an LVM logical volume: the snapshot backend creates its "
                             "COW volumes in the LV's volume group")
        if target.size % SECTOR:
            raise UsageError(f"{target.path}: size {target.size} is not a whole number of sectors")
        chunk_kib = options.get("chunk_kib") or DEFAULT_CHUNK_KIB
        if chunk_kib < 4 or chunk_kib & (chunk_kib - 1) or chunk_kib > 1024:
            raise UsageError(f"--snapshot-chunk must be a power of two between 4 and 1024 KiB, not {chunk_kib}")
        original = check_enrollable(target, state)
        record = cls.new_record(target, original)
        backend = cls(state, record)
        lv = target.lv
        cow_size = lvm.round_to_extents(options.get("cow_size") or default_cow_size(target.size),
                                        lv.extent_size or 4 * MIB)
        record["snapshot"] = {"chunk_sectors": chunk_kib * 1024 // SECTOR, "cow_size": cow_size, "cow": [],
                              "active": None}

        with UndoStack(f"enroll {target.display}") as undo:
            backend.save()
            undo.push("forget the record", lambda: state.remove(record["id"]))
            fault_point("enroll.after-record")
            for slot in (0, 1):
                name = lvm.helper_lv_name(lv.name, f"cow{slot}")
                record["created_lvs"].append({"vg": lv.vg, "name": name})
                backend.save()
                lvm.create_lv(lv.vg, name, cow_size)
                undo.push(f"remove {lv.vg}/{name}", lambda name=name: lvm.remove_lv(lv.vg, name))
                record["snapshot"]["cow"].append({"vg": lv.vg, "name": name,
                                                  "path": lv_device_path({"vg": lv.vg, "name": name})})
            backend.save()
            fault_point("enroll.after-metadata")
            backend._build_stack(target.dev.name, original, undo, generation=1, slot=0, fresh=True)
            record["phase"] = "enrolled"
            record["first_checkpoint"] = 1
            record["checkpoint"] = 1
            backend.save()
            fault_point("enroll.after-save")
        return backend

    def _build_stack(self, dev_name: str, original: str, undo: UndoStack, *, generation: int, slot: int,
                     fresh: bool) -> None:
        hidden = dm.hidden_name(self.ident, "orig")
        self.record["hidden"] = {"origin": hidden}
        self.save()
        hidden_dev = dm.create(hidden, original, uuid=dm.hidden_uuid(self.ident, "orig"))
        undo.push(f"remove {hidden}", lambda: dm.remove(hidden))
        fault_point("enroll.after-hidden")

        # The first snapshot goes live before the LV is switched: writes still go straight to the PVs
        # until the switch, and the enrollment's checkpoint is the moment the switch completes.
        if fresh:
            _zero_header(self._cow_path(slot), self.snap["chunk_sectors"] * SECTOR)
        snap = self._snap_name(generation)
        dm.create(snap, self._snap_table(hidden_dev.devno, self._cow_path(slot)),
                  uuid=dm.hidden_uuid(self.ident, f"snap{generation}"))
        undo.push(f"remove {snap}", lambda: dm.remove(snap))
        self.snap["active"] = {"generation": generation, "slot": slot, "name": snap}

        tracking = f"0 {self.size // SECTOR} snapshot-origin {hidden_dev.devno}\n"
        self.swap_in_tracking_table(dev_name, tracking, original, undo)

    def reattach(self, target: Target) -> None:
        """After a reboot: the COW volume of the active snapshot still holds its exception table (it is
        persistent); a snapshot rebuilt on it carries on from where it was."""
        original = check_enrollable(target, self.state)
        if target.size != self.size:
            raise UsageError(f"{target.path}: its size changed since it was enrolled: unenroll and enroll again")
        active = self.snap["active"]
        with CowDevice(self._cow_path(active["slot"])) as cow:
            header = cow.header()
        if header is None:
            raise MetadataError(self._cow_path(active["slot"]), "the active snapshot's COW store is gone")
        self.record["original_table"] = original
        self.record["dm_name"] = target.dev.name
        with UndoStack(f"re-attach {target.display}") as undo:
            self._build_stack(target.dev.name, original, undo, generation=active["generation"],
                              slot=active["slot"], fresh=False)
            self.save()

    # -- a pass ------------------------------------------------------------------------------------------

    def _our_snapshots(self) -> dict[int, dm.DmDevice]:
        out = {}
        for dev in dm.devices_of(self.ident):
            m = _SNAP_RE.search(dev.uuid)
            if m:
                out[int(m.group(1))] = dev
        return out

    def _interval_path(self, generation: int):
        return self.state.device_dir(self.ident) / f"interval-{generation}.dmap"

    def _save_interval(self, generation: int, dirty: DirtyMap) -> None:
        folder = self.state.device_folder(self.ident)
        dirty.save(self._interval_path(generation))
        for path in folder.glob("interval-*.dmap"):
            try:
                g = int(path.stem.split("-")[1])
            except (IndexError, ValueError):
                continue
            if g < generation - KEEP_INTERVALS:
                path.unlink(missing_ok=True)

    def _read_snapshot(self, slot: int, invalid: bool) -> DirtyMap:
        """The chunks the table on COW ``slot`` lists (all of them, with a warning, if it is invalid)."""
        if invalid:
            return all_dirty(self.record, "the snapshot overflowed its COW volume (or failed) and was "
                                          "invalidated")
        with CowDevice(self._cow_path(slot)) as cow:
            header = cow.header()
            if header is None:
                raise MetadataError(cow.path, "the snapshot's COW store has no header")
            if not header.valid:
                return all_dirty(self.record, "the snapshot overflowed its COW volume (or failed) and was "
                                              "invalidated")
            table = cow.exception_table(origin_chunks=-(-self.size // header.chunk_bytes))
        dirty = DirtyMap.for_size(self.size, self.chunk_size)
        mark_exceptions(dirty, table)
        return dirty

    def _finish_switch(self, old_gen: int, old_slot: int, new_gen: int, new_slot: int, dirty: DirtyMap) -> None:
        self._save_interval(old_gen, dirty)
        self.snap["active"] = {"generation": new_gen, "slot": new_slot, "name": self._snap_name(new_gen)}
        self.record["checkpoint"] = new_gen
        self.save()

    def _recover(self) -> None:
        """Bring the devices and the record back in line after an interrupted pass (see the module doc)."""
        active = self.snap["active"]
        snaps = self._our_snapshots()
        g = active["generation"]
        if g in snaps:
            for gen, dev in snaps.items():
                if gen != g:
                    dm.remove(dev.name)
            return
        nxt = snaps.get(g + 1)
        if nxt is not None and nxt.live_table and not nxt.suspended:
            # Killed after the switch: snapG is gone, its table is still on its COW volume.
            dirty = self._read_snapshot(active["slot"], invalid=False)
            self._finish_switch(g, active["slot"], g + 1, 1 - active["slot"], dirty)
            for gen, dev in snaps.items():
                if gen != g + 1:
                    dm.remove(dev.name)
            return
        raise TrackingError(f"{self.device}: its checkpoint snapshot {active['name']} is gone: unenroll, enroll "
                            "again and copy the device whole")

    def dirty_since(self, since: int | None = None) -> tuple[DirtyMap, int]:
        with self.state.lock(self.ident):
            self.reload()
            since = self.validate_since(since)
            dev = self.require_tracking()
            self._recover()
            active = self.snap["active"]
            g, slot = active["generation"], active["slot"]
            for older in range(since, g):
                if not self._interval_path(older).exists():
                    raise UsageError(f"checkpoint {since} of {self.device} is too old: what changed after "
                                     f"checkpoint {older} is no longer kept")
            new_gen, new_slot = g + 1, 1 - slot
            new_name = self._snap_name(new_gen)
            hidden = dm.info(self.record["hidden"]["origin"])

            with UndoStack(f"new checkpoint of {self.device}") as undo:
                _zero_header(self._cow_path(new_slot), self.snap["chunk_sectors"] * SECTOR)
                dm.create(new_name, None, uuid=dm.hidden_uuid(self.ident, f"snap{new_gen}"))
                undo.push(f"remove {new_name}", lambda: dm.remove(new_name))
                dm.load(new_name, self._snap_table(hidden.devno, self._cow_path(new_slot)))
                frozen = dev.suspended
                if not frozen:
                    dm.suspend(dev.name, lockfs=False)
                try:
                    fault_point("snapshot.dirty.while-suspended")
                    dm.resume(new_name)
                finally:
                    if not frozen:
                        dm.resume(dev.name)
                fault_point("snapshot.dirty.after-switch")

            old_invalid = _snapshot_invalid(active["name"])
            dm.remove(active["name"])
            fault_point("snapshot.dirty.after-remove")
            dirty = self._read_snapshot(slot, old_invalid)
            self._finish_switch(g, slot, new_gen, new_slot, dirty)

            result = DirtyMap.for_size(self.size, self.chunk_size)
            for older in range(since, new_gen):
                try:
                    union_into(result, DirtyMap.load(self._interval_path(older)))
                except DirtyMapFileError as exc:
                    raise TrackingError(f"{self.device}: {exc}") from None
            return result, new_gen

    def detach(self) -> list[str]:
        with self.state.lock(self.ident):
            self.reload()
            return self.teardown()

    def status(self) -> dict:
        out = self.base_status()
        info = {k: v for k, v in self.snap.items() if k != "cow"}
        info["cow_volumes"] = [f"{c['vg']}/{c['name']}" for c in self.snap["cow"]]
        info["chunk_bytes"] = self.snap["chunk_sectors"] * SECTOR
        if out["state"] in ("tracking", "frozen", "suspended"):
            active = self.snap["active"]
            try:
                lines = dm.status(active["name"])
                info["snapshot_status"] = lines[0].split(None, 3)[3] if lines else None
                invalid = _snapshot_invalid(active["name"], lines)
                info["invalid"] = invalid
                if invalid:
                    out["dirty"] = self.nchunks
                    out["warning"] = "the snapshot overflowed: the next pass reports every chunk dirty"
                else:
                    out["dirty"] = self._read_snapshot(active["slot"], False).count()
            except BlocktrackError as exc:
                out["warning"] = str(exc)
        out["snapshot"] = info
        return out


def _snapshot_invalid(name: str, lines: list[str] | None = None) -> bool:
    """``dmsetup status`` of a snapshot: ``<alloc>/<total> <metadata>`` while valid; ``Invalid`` once
    the store overflowed or failed; ``Overflow`` when writes to the snapshot itself overflowed it."""
    if lines is None:
        lines = dm.status(name)
    if not lines:
        raise TrackingError(f"{name}: no status")
    fields = lines[0].split()
    if len(fields) < 4 or fields[2] != "snapshot":
        raise TrackingError(f"{name}: unexpected status {lines[0]!r}")
    return not re.fullmatch(r"\d+/\d+", fields[3])


def _zero_header(path: str, length: int) -> None:
    """Zero the first chunk of a COW volume (O_DIRECT, exclusive: nobody may be using it) so the kernel
    formats a new exception store on it."""
    fd = None
    buf = mmap.mmap(-1, length)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_EXCL | os.O_CLOEXEC)
        if os.pwritev(fd, [buf], 0) != length:
            raise DeviceError(f"{path}: short write while zeroing the snapshot header")
        os.fsync(fd)
    except OSError as e:
        check(-(e.errno or 5), "zero the COW header", path)
        raise
    finally:
        buf.close()
        if fd is not None:
            os.close(fd)
