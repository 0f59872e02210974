"""The era backend: dm-era under the enrolled device records, per 1 MiB block, the last era it was written in.

Stack after enrollment (the device keeps its name, /dev/VG/LV, and its dm UUID)::

    VG-LV                        era <metadata> <hidden> 2048        (the table we load into the LV)
    blocktrack-<id>-orig         <the LV's original table>           (linear/striped onto the PVs)
    VG-blocktrack_LV_era         linear                              (metadata LV we create, or --metadata)

Writes. dm-era marks a block in the current era's on-disk writeset and commits the metadata *before* it
issues the first write to that block in that era (later writes to it pass straight through), so every
acknowledged write is on record, across a crash too.

A pass (``dirty_since``):

1. ``take_metadata_snap``: the era rolls over (era N is archived, N+1 starts) and the metadata is
   committed and snapshotted. The snapshot's superblock holds ``current_era = N+1``: the new checkpoint.
2. suspend and resume the device (no filesystem freeze): a write that was already on record in era <= N
   passes era without being marked again and may still be in flight; suspending waits for every such
   write, so when we return, all writes of the eras we report have reached the disk and reading a
   reported chunk sees them. (Resume rolls the era over again: harmless.)
3. read the held snapshot with our reader (era_metadata.py; see there why not era_invalidate):
   blocks with era >= since.
4. ``drop_metadata_snap``.

A process killed between 1 and 4 leaves the snapshot held; the next pass drops it first (the record's
checkpoint was not advanced, so nothing is lost). While the device is frozen (suspended) the era target
answers neither status nor messages (its worker is stopped; such calls block until resume), so a pass
while frozen reads the metadata directly: suspend archived the current writeset and committed, nothing
changes until resume, and resume will start era ``current_era + 1`` -- the new checkpoint.

Checkpoints are era numbers; the first is 1 (fresh metadata is era 0 until the first resume). Any
``since`` between the first checkpoint and the latest one can be answered, as the era array keeps the
last era of every block.
"""

from __future__ import annotations

import os
import warnings

from blocktrack.backends.base import (SECTOR, Backend, Target, UndoStack, check_enrollable, fault_point, lv_device_path,
                                      mark_sorted_chunks)
from blocktrack.dirtymap import DirtyMap
from blocktrack.errors import (AllDirtyWarning, BlocktrackError, DeviceError, MetadataError, TrackingError,
                               UsageError, check)
from blocktrack.kernel import dm, lvm
from blocktrack.kernel.blockdev import device_size, is_block_device
from blocktrack.kernel.era_metadata import DeviceSource, EraMetadata
from blocktrack.state import StateDir

BLOCK_SECTORS = 2048                 # 1 MiB era blocks: one per dirty-map chunk
ZERO_BYTES = 4096                    # an all-zero superblock makes dm-era format new metadata
MIB = 1 << 20


def metadata_size_for(nchunks: int) -> int:
    """Room for the era array (4 bytes a block, twice: a held snapshot pins the old copy while the live
    one changes), a few writesets awaiting digestion, btree nodes and the space map."""
    return max(8 * MIB, 4 * MIB + 12 * nchunks)


def minimum_metadata_size(nchunks: int) -> int:
    return 1 * MIB + 8 * nchunks


class EraStatus:
    """``<md block size> <used>/<total> <current era> <held metadata root | ->``"""

    def __init__(self, line: str):
        fields = line.split()
        if len(fields) < 7 or fields[2] != "era":
            raise TrackingError(f"unexpected era status: {line!r}")
        used, total = fields[4].split("/")
        self.used, self.total = int(used), int(total)
        self.current_era = int(fields[5])
        self.held_root = None if fields[6] == "-" else int(fields[6])


class EraBackend(Backend):
    name = "era"

    # -- helpers ------------------------------------------------------------------------------------

    @property
    def era(self) -> dict:
        return self.record["era"]

    def _era_status(self, dev_name: str) -> EraStatus:
        lines = dm.status(dev_name)
        if len(lines) != 1:
            raise TrackingError(f"{dev_name}: expected one era target, status has {len(lines)} lines")
        return EraStatus(lines[0])

    def _tracking_table(self, meta_devno: str, hidden_devno: str) -> str:
        sectors = self.size // SECTOR
        return f"0 {sectors} era {meta_devno} {hidden_devno} {BLOCK_SECTORS}\n"

    @staticmethod
    def _devno(path: str) -> str:
        st = os.stat(path)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    # -- attach ----------------------------------------------------------------------------------------

    @classmethod
    def attach(cls, state: StateDir, target: Target, options: dict) -> "EraBackend":
        if target.size % SECTOR:
            raise UsageError(f"{target.path}: size {target.size} is not a whole number of sectors")
        original = check_enrollable(target, state)
        record = cls.new_record(target, original)
        backend = cls(state, record)
        meta_path = options.get("metadata")
        nchunks = record["nchunks"]
        if meta_path:
            _check_metadata_device(meta_path, nchunks, target)
        elif target.lv is None:
            raise UsageError(f"{target.path} is not an LVM logical volume: give a metadata device with --metadata")

        with UndoStack(f"enroll {target.display}") as undo:
            backend.save()                                          # phase: enrolling
            undo.push("forget the record", lambda: state.remove(record["id"]))
            fault_point("enroll.after-record")

            if meta_path is None:
                lv = target.lv
                name = lvm.helper_lv_name(lv.name, "era")
                size = lvm.round_to_extents(metadata_size_for(nchunks), lv.extent_size or 4 * MIB)
                record["created_lvs"].append({"vg": lv.vg, "name": name})
                backend.save()
                created = lvm.create_lv(lv.vg, name, size)
                undo.push(f"remove {lv.vg}/{name}", lambda: lvm.remove_lv(lv.vg, name))
                meta_path = lv_device_path({"vg": lv.vg, "name": name})
                record["era"] = {"metadata": meta_path, "metadata_size": created.size, "created_metadata": True}
            else:
                record["era"] = {"metadata": os.path.realpath(meta_path) if not meta_path.startswith("/dev/")
                                 else meta_path, "metadata_size": device_size(meta_path), "created_metadata": False}
            record["era"]["block_sectors"] = BLOCK_SECTORS
            backend.save()
            fault_point("enroll.after-metadata")
            _zero_superblock(record["era"]["metadata"])

            backend._build_stack(target.dev.name, original, undo)
            record["phase"] = "enrolled"
            record["first_checkpoint"] = 1
            record["checkpoint"] = 1
            backend.save()
            fault_point("enroll.after-save")
        return backend

    def _build_stack(self, dev_name: str, original: str, undo: UndoStack) -> None:
        """Hidden copy of the original table, then the era table live in the device (load, suspend,
        resume). Used by attach (fresh metadata) and reattach (existing metadata)."""
        hidden = dm.hidden_name(self.ident, "orig")
        self.record["hidden"] = {"origin": hidden}
        self.save()
        hidden_dev = dm.create(hidden, original, uuid=dm.hidden_uuid(self.ident, "orig"))
        undo.push(f"remove {hidden}", lambda: dm.remove(hidden))
        fault_point("enroll.after-hidden")

        meta_devno = self._devno(self.era["metadata"])
        tracking = self._tracking_table(meta_devno, hidden_dev.devno)
        self.swap_in_tracking_table(dev_name, tracking, original, undo)   # dm-era opens (or formats) its metadata

    def reattach(self, target: Target) -> None:
        original = check_enrollable(target, self.state)
        if target.size != self.size:
            raise UsageError(f"{target.path}: its size changed since it was enrolled: unenroll and enroll again")
        meta = self.era["metadata"]
        if not is_block_device(meta):
            raise UsageError(f"the era metadata device {meta} is not there (activate it first)")
        with DeviceSource(meta) as src:
            sb = EraMetadata(src).superblock(0)
        if sb.data_block_size != BLOCK_SECTORS or sb.nr_blocks != self.nchunks:
            raise MetadataError(meta, f"era metadata for {sb.nr_blocks} blocks of {sb.data_block_size} sectors, "
                                      f"not this device's {self.nchunks} of {BLOCK_SECTORS}")
        # LVM may map the LV onto different device numbers after a reboot: its table now is the original.
        self.record["original_table"] = original
        self.record["dm_name"] = target.dev.name
        with UndoStack(f"re-attach {target.display}") as undo:
            self._build_stack(target.dev.name, original, undo)
            self.save()

    # -- a pass ------------------------------------------------------------------------------------------

    def dirty_since(self, since: int | None = None) -> tuple[DirtyMap, int]:
        with self.state.lock(self.ident):
            self.reload()
            since = self.validate_since(since)
            dev = self.require_tracking()
            meta = self.era["metadata"]
            if dev.suspended:
                with DeviceSource(meta) as src:
                    md = EraMetadata(src)
                    sb = md.superblock(0)
                    blocks = md.written_since(sb, since)
                new_checkpoint = sb.current_era + 1
            else:
                status = self._era_status(dev.name)
                if status.held_root is not None:
                    warnings.warn(AllDirtyWarning(f"{self.device}: dropping a metadata snapshot left by an "
                                                  "interrupted pass"), stacklevel=2)
                    dm.message(dev.name, "drop_metadata_snap")
                dm.message(dev.name, "take_metadata_snap")
                try:
                    fault_point("era.dirty.after-take-snap")
                    _drain(dev.name)
                    status = self._era_status(dev.name)
                    if status.held_root is None:
                        raise TrackingError(f"{dev.name}: take_metadata_snap holds no metadata snapshot")
                    with DeviceSource(meta) as src:
                        md = EraMetadata(src)
                        sb = md.superblock(status.held_root)
                        blocks = md.written_since(sb, since)
                    new_checkpoint = sb.current_era
                finally:
                    dm.message(dev.name, "drop_metadata_snap")
            if sb.nr_blocks != self.nchunks:
                raise MetadataError(meta, f"era metadata covers {sb.nr_blocks} blocks, the device {self.nchunks}")
            dirty = DirtyMap.for_size(self.size, self.chunk_size)
            mark_sorted_chunks(dirty, blocks)
            fault_point("era.dirty.before-save")
            if new_checkpoint > self.record["checkpoint"]:
                self.record["checkpoint"] = new_checkpoint
            self.save()
            return dirty, new_checkpoint

    def detach(self) -> list[str]:
        with self.state.lock(self.ident):
            self.reload()
            return self.teardown()

    def status(self) -> dict:
        out = self.base_status()
        era = dict(self.era)
        if out["state"] == "tracking":
            dev = self.current_device()
            try:
                st = self._era_status(dev.name)
                era.update(current_era=st.current_era, metadata_blocks_used=st.used,
                           metadata_blocks_total=st.total, held_metadata_snapshot=st.held_root)
                out["dirty"] = self._count_since_checkpoint(dev.name)
            except BlocktrackError as exc:
                out["warning"] = str(exc)
        out["era"] = era
        return out

    def _count_since_checkpoint(self, dev_name: str) -> int | None:
        """Chunks written since the last checkpoint, from a short-lived metadata snapshot (it rolls the
        era over, which changes nothing for the next pass). None when a snapshot is already held."""
        with self.state.lock(self.ident, wait=False):
            if self._era_status(dev_name).held_root is not None:
                return None
            dm.message(dev_name, "take_metadata_snap")
            try:
                held = self._era_status(dev_name).held_root
                with DeviceSource(self.era["metadata"]) as src:
                    md = EraMetadata(src)
                    return len(md.written_since(md.superblock(held), self.record["checkpoint"]))
            finally:
                dm.message(dev_name, "drop_metadata_snap")


def _drain(dev_name: str) -> None:
    """Suspend (no filesystem freeze) and resume: returns once every write issued before it completed."""
    dm.suspend(dev_name, lockfs=False)
    try:
        fault_point("era.dirty.while-suspended")
    finally:
        dm.resume(dev_name)


def _zero_superblock(path: str) -> None:
    """Zero the first metadata block so dm-era formats fresh metadata (O_DIRECT, exclusive open)."""
    import mmap

    fd = None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_EXCL | os.O_CLOEXEC)
        buf = mmap.mmap(-1, ZERO_BYTES)
        try:
            if os.pwritev(fd, [buf], 0) != ZERO_BYTES:
                raise DeviceError(f"{path}: short write while zeroing the era superblock")
            os.fsync(fd)
        finally:
            buf.close()
    except OSError as e:
        check(-(e.errno or 5), "zero the era metadata superblock", path)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _check_metadata_device(path: str, nchunks: int, target: Target) -> None:
    if not is_block_device(path):
        raise UsageError(f"--metadata {path}: not a block device")
    st, tst = os.stat(path), os.stat(target.path)
    if st.st_rdev == tst.st_rdev:
        raise UsageError("--metadata cannot be the device being enrolled")
    size = device_size(path)
    need = minimum_metadata_size(nchunks)
    if size < need:
        raise UsageError(f"--metadata {path} is too small: {size} bytes, a device of {nchunks} MiB needs at "
                         f"least {need} (recommended {metadata_size_for(nchunks)})")
    try:                                         # unused: nobody (filesystem, dm, another tool) holds it
        os.close(os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as e:
        raise UsageError(f"--metadata {path} is in use ({os.strerror(e.errno)}): give an unused device; "
                         "its contents are overwritten") from None
