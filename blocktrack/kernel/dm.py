"""Device-mapper through its ioctl ABI (``/dev/mapper/control``, <linux/dm-ioctl.h> version 4).

Why the ioctls and not ``dmsetup``:

* **Our hidden devices must stay out of udev's way.** A device created by dmsetup carries a udev cookie
  that marks its uevents as coming from libdevmapper, so udev runs every rule on it: a /dev/mapper link,
  ``blkid``, and ``/dev/disk/by-uuid/<fs uuid>`` pointing at *our* copy of the LV's table (the same
  filesystem UUID as the LV). LVM avoids this for its own hidden layers (``-real``, ``-cow``) by setting
  udev flags in the cookie, which dmsetup cannot set. A device created through the ioctl without a cookie
  gets udev's "not from libdevmapper" treatment (55-dm.rules: its add event sets the subsystem, disk and
  other rules' disable flags, and later events take them back from the udev database): no blkid scan, no
  by-uuid link, no LVM rules; only the /dev/mapper/NAME link, which is harmless.
* **The user's LV keeps its links.** We only reload, suspend and resume it; its change events carry no
  cookie, so udev restores the flags LVM set from its database and keeps /dev/VG/LV and /dev/mapper/VG-LV
  as they were. Nothing we do needs waiting for udev: no node of ours is ever created or removed by it.
* **Speed and fewer moving parts in a pass.** A pass is ~8 dm operations, two of them a suspend/resume
  of the user's device; an exec of dmsetup between them lengthens the suspended window (about 5 ms
  natively, about a second under the lab's emulation), and an ioctl does not.

Tables are exchanged as text lines, ``<start> <length> <target> <args>`` with devices as ``major:minor``,
exactly as ``dmsetup table`` prints them (tests/kernel compare the two): a table read with ``table()``
and loaded again with ``load()`` round-trips byte for byte, which ``unenroll`` relies on.

Naming (what marks a device as ours): every device blocktrack creates is called
``blocktrack-<id>-<role>`` and has the dm UUID ``BLOCKTRACK-<id>-<role>``. LVM's udev rules act only on
UUIDs starting with ``LVM-``; a udev rule of ours can match ``ENV{DM_UUID}=="BLOCKTRACK-*"``.

Never ask a suspended era device for its status or send it a message: the era target answers both
through its worker, which is stopped while suspended, and the ioctl then blocks, uninterruptibly, until
someone resumes the device. The backends check ``suspended`` first.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass

from ioctl_opt import IOWR

from blocktrack.errors import DeviceError, DmIoctlError, IOFailure, UsageError

NAME_PREFIX = "blocktrack-"
UUID_PREFIX = "BLOCKTRACK-"
CONTROL = "/dev/mapper/control"

# <linux/dm-ioctl.h>
_HEADER = struct.Struct("=3I I I I i I I I Q 128s 129s 7s")        # struct dm_ioctl, 312 bytes
_SPEC = struct.Struct("=Q Q i I 16s")                              # struct dm_target_spec, 40 bytes
_NAME_LIST = struct.Struct("=Q I")                                 # struct dm_name_list (+ name)
_MSG = struct.Struct("=Q")                                         # struct dm_target_msg (+ message)
_VERSION = (4, 0, 0)
_DM_IOCTL = 0xFD


def _cmd(nr: int) -> int:
    return IOWR(_DM_IOCTL, nr, ctypes.c_char * _HEADER.size)


DM_VERSION = _cmd(0)
DM_LIST_DEVICES = _cmd(2)
DM_DEV_CREATE = _cmd(3)
DM_DEV_REMOVE = _cmd(4)
DM_DEV_SUSPEND = _cmd(6)
DM_DEV_STATUS = _cmd(7)
DM_TABLE_LOAD = _cmd(9)
DM_TABLE_CLEAR = _cmd(10)
DM_TABLE_STATUS = _cmd(12)
DM_TARGET_MSG = _cmd(14)

READONLY_FLAG = 1 << 0
SUSPEND_FLAG = 1 << 1
STATUS_TABLE_FLAG = 1 << 4
ACTIVE_PRESENT_FLAG = 1 << 5
INACTIVE_PRESENT_FLAG = 1 << 6
BUFFER_FULL_FLAG = 1 << 8
SKIP_LOCKFS_FLAG = 1 << 10
QUERY_INACTIVE_TABLE_FLAG = 1 << 12
DATA_OUT_FLAG = 1 << 16

_CMD_NAMES = {DM_VERSION: "version", DM_LIST_DEVICES: "list devices", DM_DEV_CREATE: "create", DM_DEV_REMOVE: "remove",
              DM_DEV_SUSPEND: "suspend/resume", DM_DEV_STATUS: "info", DM_TABLE_LOAD: "load a table",
              DM_TABLE_CLEAR: "clear the inactive table", DM_TABLE_STATUS: "read the table/status",
              DM_TARGET_MSG: "send a message"}

_control_fd = None
_control_lock = threading.Lock()


def _control() -> int:
    global _control_fd
    with _control_lock:
        if _control_fd is None:
            try:
                _control_fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise DeviceError(f"{CONTROL} is missing: this kernel has no device-mapper (dm-mod), which "
                                  "blocktrack's era and snapshot backends need") from None
            except OSError as e:
                raise IOFailure(e.errno or errno.EIO, "open the device-mapper control node", CONTROL) from None
        return _control_fd


@dataclass(frozen=True)
class DmDevice:
    """What the kernel says about one mapped device (DM_DEV_STATUS)."""

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    live_table: bool
    inactive_table: bool
    suspended: bool
    read_only: bool
    segments: int
    event_nr: int

    @property
    def devno(self) -> str:
        """``major:minor``, as tables name devices."""
        return f"{self.major}:{self.minor}"

    @property
    def node(self) -> str:
        """The kernel's own node for the device (devtmpfs makes it, with or without udev)."""
        return f"/dev/dm-{self.minor}"

    @property
    def is_ours(self) -> bool:
        return self.uuid.startswith(UUID_PREFIX)


# -- the ioctl call --------------------------------------------------------------------------------------

def _kernel_log_tail(since: float) -> str:
    """device-mapper lines the kernel logged since ``since`` (CLOCK_MONOTONIC), for error messages: the
    ioctls return only an errno, the reason ("era: Error opening metadata device") goes to the log."""
    lines = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        while True:
            try:
                rec = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError as e:            # EPIPE: records overwritten while reading; go on
                if e.errno == errno.EPIPE:
                    continue
                break
            prefix, _, text = rec.partition(";")
            fields = prefix.split(",")
            if len(fields) >= 3 and fields[2].isdigit() and int(fields[2]) / 1e6 >= since - 0.5:
                text = text.split("\n", 1)[0]
                if "device-mapper" in text:
                    lines.append(text.replace("device-mapper: ", ""))
    finally:
        os.close(fd)
    return "; ".join(lines[-3:])


def _ioctl(cmd: int, *, name: str = "", uuid: str = "", dev: int = 0, flags: int = 0, data: bytes = b"",
           target_count: int = 0, event_nr: int = 0, out_size: int = 16384) -> tuple[tuple, bytes]:
    """One DM ioctl; returns (the header fields, the data area). Grows the buffer while the kernel says
    it was too small."""
    if len(name.encode()) >= 128 or len(uuid.encode()) >= 129:
        raise UsageError(f"device-mapper name or UUID too long: {name!r} {uuid!r}")
    size = max(out_size, _HEADER.size + len(data) + 8)
    while True:
        buf = bytearray(size)
        _HEADER.pack_into(buf, 0, *_VERSION, size, _HEADER.size, target_count, 0, flags, event_nr, 0, dev,
                          name.encode(), uuid.encode(), b"")
        buf[_HEADER.size:_HEADER.size + len(data)] = data
        started = time.monotonic()
        try:
            fcntl.ioctl(_control(), cmd, buf, True)
        except OSError as e:
            err = e.errno or errno.EIO
            reason = _kernel_log_tail(started) if cmd in (DM_TABLE_LOAD, DM_DEV_SUSPEND, DM_TARGET_MSG) else ""
            raise DmIoctlError(err, _CMD_NAMES.get(cmd, "ioctl"), name or uuid or f"device {dev:#x}",
                               reason) from None
        header = _HEADER.unpack_from(buf)
        out_flags = header[7]
        if out_flags & BUFFER_FULL_FLAG:
            size *= 4
            if size > 64 << 20:
                raise DeviceError(f"device-mapper: the answer to {_CMD_NAMES.get(cmd)} does not fit in 64 MiB")
            continue
        data_start, data_size = header[4], header[3]
        return header, bytes(buf[data_start:data_size]) if data_size > data_start else b""


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _device_from_header(header: tuple) -> DmDevice:
    (_v0, _v1, _v2, _size, _start, target_count, open_count, flags, event_nr, _pad, dev, name, uuid, _data) = header
    return DmDevice(name=_cstr(name), uuid=_cstr(uuid), major=os.major(dev), minor=os.minor(dev),
                    open_count=open_count, live_table=bool(flags & ACTIVE_PRESENT_FLAG),
                    inactive_table=bool(flags & INACTIVE_PRESENT_FLAG), suspended=bool(flags & SUSPEND_FLAG),
                    read_only=bool(flags & READONLY_FLAG), segments=target_count, event_nr=event_nr)


def _missing(exc: DmIoctlError) -> bool:
    return exc.errno == errno.ENXIO


# -- queries ---------------------------------------------------------------------------------------------

def version() -> tuple[int, int, int]:
    header, _ = _ioctl(DM_VERSION)
    return header[0], header[1], header[2]


def info(name: str) -> DmDevice | None:
    """The device called ``name``, or None when there is none."""
    try:
        header, _ = _ioctl(DM_DEV_STATUS, name=name)
    except DmIoctlError as exc:
        if _missing(exc):
            return None
        raise
    return _device_from_header(header)


def info_by_devno(major: int, minor: int) -> DmDevice | None:
    try:
        header, _ = _ioctl(DM_DEV_STATUS, dev=os.makedev(major, minor))
    except DmIoctlError as exc:
        if _missing(exc):
            return None
        raise
    return _device_from_header(header)


def list_devices() -> list[DmDevice]:
    _header, data = _ioctl(DM_LIST_DEVICES)
    names = []
    offset = 0
    while data and offset + _NAME_LIST.size <= len(data):
        dev, nxt = _NAME_LIST.unpack_from(data, offset)
        if dev == 0:
            break                                            # "no devices" is one record with dev 0
        names.append(_cstr(data[offset + _NAME_LIST.size:]))
        if nxt == 0:
            break
        offset += nxt
    out = []
    for name in names:
        dev = info(name)
        if dev is not None:                                  # removed in between
            out.append(dev)
    return out


def dm_major() -> int | None:
    """The block major of device-mapper (from /proc/devices), or None when the kernel has no dm."""
    try:
        with open("/proc/devices") as f:
            block = False
            for line in f:
                if line.startswith("Block devices"):
                    block = True
                elif block:
                    parts = line.split()
                    if len(parts) == 2 and parts[1] == "device-mapper":
                        return int(parts[0])
    except OSError:
        pass
    return None


def device_for_path(path: str) -> DmDevice:
    """The mapped device behind ``path`` (/dev/VG/LV, /dev/mapper/NAME, /dev/dm-N); a clear error when
    ``path`` is missing or not a device-mapper device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such device") from None
    if not stat.S_ISBLK(st.st_mode):
        raise UsageError(f"{path} is not a block device")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    dmmaj = dm_major()
    if dmmaj is None:
        raise DeviceError("this kernel has no device-mapper (dm-mod): blocktrack's era and snapshot "
                          "backends need it")
    if major != dmmaj:
        raise UsageError(f"{path} ({major}:{minor}) is not a device-mapper device: enroll an LVM logical "
                         f"volume (/dev/VG/LV) or another mapped device")
    dev = info_by_devno(major, minor)
    if dev is None:
        raise UsageError(f"{path}: device-mapper knows no device {major}:{minor}")
    return dev


# -- tables -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TableLine:
    start: int
    length: int
    target: str
    args: str

    def __str__(self) -> str:
        return f"{self.start} {self.length} {self.target}" + (f" {self.args}" if self.args else "")


def parse_table(text: str) -> list[TableLine]:
    lines = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        parts = raw.split(None, 3)
        if len(parts) < 3:
            raise DeviceError(f"cannot parse device-mapper table line {raw!r}")
        lines.append(TableLine(int(parts[0]), int(parts[1]), parts[2], parts[3] if len(parts) > 3 else ""))
    return lines


def normalize_table(text: str) -> str:
    """A table as text with exactly one newline after each line (what ``table()`` returns)."""
    return "".join(line.rstrip("\n") + "\n" for line in text.splitlines() if line.strip())


def _read_specs(data: bytes, count: int) -> list[TableLine]:
    lines = []
    offset = 0
    for _ in range(count):
        start, length, _status, nxt, ttype = _SPEC.unpack_from(data, offset)
        params = _cstr(data[offset + _SPEC.size:])
        lines.append(TableLine(start, length, _cstr(ttype), params))
        offset = nxt                                  # output: relative to the start of the data area
    return lines


def _table_status(name: str, flags: int) -> list[TableLine]:
    header, data = _ioctl(DM_TABLE_STATUS, name=name, flags=flags)
    return _read_specs(data, header[5])


def table(name: str, *, inactive: bool = False) -> str:
    """The table as ``dmsetup table`` prints it (the live one, or the loaded inactive one)."""
    flags = STATUS_TABLE_FLAG | (QUERY_INACTIVE_TABLE_FLAG if inactive else 0)
    return "".join(f"{line}\n" for line in _table_status(name, flags))


def status(name: str) -> list[str]:
    """Status lines as ``dmsetup status`` prints them: ``<start> <length> <target> <target status>``.
    (See the module docstring: never on a suspended era device.)"""
    return [str(line) for line in _table_status(name, 0)]


def _pack_table(table_text: str) -> tuple[bytes, int]:
    lines = parse_table(table_text)
    if not lines:
        raise DeviceError("refusing to load an empty table")
    out = bytearray()
    for i, line in enumerate(lines):
        params = line.args.encode() + b"\0"
        length = _SPEC.size + len(params)
        length += -length % 8
        nxt = length if i + 1 < len(lines) else 0    # input: relative to the start of this spec
        target = line.target.encode()
        if len(target) >= 16:
            raise DeviceError(f"target name too long: {line.target}")
        out += _SPEC.pack(line.start, line.length, 0, nxt, target) + params.ljust(length - _SPEC.size, b"\0")
    return bytes(out), len(lines)


# -- changes ----------------------------------------------------------------------------------------------

def create(name: str, table_text: str | None, *, uuid: str | None = None, read_only: bool = False) -> DmDevice:
    """Create a device (no udev cookie: see the module docstring), and with a table, load and activate
    it. On a failure after the device exists, it is removed again."""
    header, _ = _ioctl(DM_DEV_CREATE, name=name, uuid=uuid or "", flags=READONLY_FLAG if read_only else 0)
    if table_text is not None:
        try:
            load(name, table_text, read_only=read_only)
            resume(name)
        except BaseException:
            try:
                remove(name)
            except DeviceError:
                pass
            raise
    dev = info(name)
    if dev is None:
        raise DeviceError(f"device-mapper: {name} vanished right after it was created")
    return dev


def load(name: str, table_text: str, *, read_only: bool = False) -> None:
    """Load ``table_text`` into the device's inactive slot (the target constructors run now)."""
    data, count = _pack_table(table_text)
    _ioctl(DM_TABLE_LOAD, name=name, data=data, target_count=count, flags=READONLY_FLAG if read_only else 0)


def clear(name: str) -> None:
    """Drop the inactive table, if any."""
    _ioctl(DM_TABLE_CLEAR, name=name)


def suspend(name: str, *, lockfs: bool = True) -> None:
    """Suspend: wait for every I/O in flight to finish and hold new ones. With ``lockfs`` a mounted
    filesystem is frozen first (its dirty data written), as LVM does; without it only I/O is drained."""
    _ioctl(DM_DEV_SUSPEND, name=name, flags=SUSPEND_FLAG | (0 if lockfs else SKIP_LOCKFS_FLAG))


def resume(name: str) -> None:
    """Resume, swapping in the inactive table if one is loaded."""
    _ioctl(DM_DEV_SUSPEND, name=name)


def remove(name: str, *, retries: int = 20) -> None:
    """Remove a device; while it is busy (a short-lived open by udev or blkid), retry for about 2 s."""
    delay = 0.05
    for attempt in range(retries + 1):
        try:
            _ioctl(DM_DEV_REMOVE, name=name)
            return
        except DmIoctlError as exc:
            if exc.errno != errno.EBUSY or attempt == retries:
                raise
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def message(name: str, text: str, sector: int = 0) -> str:
    header, data = _ioctl(DM_TARGET_MSG, name=name, data=_MSG.pack(sector) + text.encode() + b"\0")
    return _cstr(data) if header[7] & DATA_OUT_FLAG else ""


def replace_table(name: str, table_text: str, *, lockfs: bool = True) -> None:
    """Load, suspend, resume: the live swap LVM itself uses."""
    load(name, table_text)
    suspend(name, lockfs=lockfs)
    resume(name)


def restore_table(name: str, table_text: str) -> bool:
    """Make ``name`` run ``table_text``, resumed, from whatever state a failed change left it in (an
    inactive table loaded, suspended, a different live table). True when anything had to change."""
    dev = info(name)
    if dev is None:
        raise DeviceError(f"cannot restore the table of {name}: the device is gone")
    changed = False
    if dev.inactive_table:
        clear(name)
        changed = True
    if table(name) != normalize_table(table_text):
        load(name, table_text)
        if not dev.suspended:
            suspend(name, lockfs=False)
        resume(name)
        return True
    if dev.suspended:
        resume(name)
        changed = True
    return changed


# -- names of our own devices -----------------------------------------------------------------------------

def hidden_name(ident: str, role: str) -> str:
    return f"{NAME_PREFIX}{ident}-{role}"


def hidden_uuid(ident: str, role: str) -> str:
    return f"{UUID_PREFIX}{ident}-{role}"


def devices_of(ident: str) -> list[DmDevice]:
    """Every device blocktrack made for enrollment ``ident`` (by UUID), whatever its state."""
    prefix = hidden_uuid(ident, "")
    return [dev for dev in list_devices() if dev.uuid.startswith(prefix)]


def find_by_uuid(uuid: str) -> DmDevice | None:
    try:
        header, _ = _ioctl(DM_DEV_STATUS, uuid=uuid)
    except DmIoctlError as exc:
        if _missing(exc):
            return None
        raise
    return _device_from_header(header)
