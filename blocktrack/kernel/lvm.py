"""LVM: which logical volume a mapped device is, and the small helper volumes blocktrack creates.

Reads go through LVM's JSON reports (``lvs --reportformat json``); changes through ``lvcreate`` and
``lvremove``, which synchronise with udev themselves. Volumes blocktrack creates carry the LVM tag
``blocktrack`` (``lvs @blocktrack`` lists them) and names that start with ``blocktrack_``.

Never run an LVM command that reactivates an *enrolled* LV (lvchange --refresh, lvextend, lvcreate -s
on it): LVM would load its own table over ours and writes would bypass tracking. blocktrack notices
this on its next pass (the live table is no longer the one it loaded) and refuses to answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from blocktrack.errors import DeviceError, KernelToolError
from blocktrack.kernel._command import run_tool

TAG = "blocktrack"
NAME_PREFIX = "blocktrack_"
_LV_FIELDS = "vg_name,lv_name,lv_uuid,lv_size,lv_path,lv_dm_path,lv_attr,lv_tags,vg_extent_size"
_LV_NAME_MAX = 100                       # LVM allows 127; keep room for suffixes


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    uuid: str
    size: int
    path: str
    dm_path: str
    attr: str
    tags: tuple[str, ...]
    extent_size: int

    @property
    def full_name(self) -> str:
        return f"{self.vg}/{self.name}"


def _lvm(*args: str, what: str | None = None) -> str:
    return run_tool(["lvm", *args], what=what)


def _report(*selection: str) -> list[LogicalVolume]:
    out = _lvm("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", _LV_FIELDS, *selection,
               what="lvs")
    rows = []
    for report in json.loads(out).get("report", []):
        for row in report.get("lv", []):
            rows.append(LogicalVolume(
                vg=row["vg_name"], name=row["lv_name"], uuid=row["lv_uuid"], size=int(row["lv_size"]),
                path=row.get("lv_path", ""), dm_path=row.get("lv_dm_path", ""), attr=row.get("lv_attr", ""),
                tags=tuple(t for t in row.get("lv_tags", "").split(",") if t),
                extent_size=int(row.get("vg_extent_size") or 0)))
    return rows


def split_dm_name(dm_name: str) -> tuple[str, str, str]:
    """(VG, LV, layer) of an LVM dm name, as ``dmsetup splitname`` does: a single '-' separates the
    parts, a doubled one stands for a '-' inside a name (``my--vg-lv-real`` is my-vg, lv, real)."""
    parts, current, i = [], [], 0
    while i < len(dm_name):
        ch = dm_name[i]
        if ch == "-":
            if i + 1 < len(dm_name) and dm_name[i + 1] == "-":
                current.append("-")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    if len(parts) < 2:
        return "", "", ""
    return parts[0], parts[1], "-".join(parts[2:])


def is_lvm_uuid(dm_uuid: str) -> bool:
    return dm_uuid.startswith("LVM-")


def lv_for_dm(dm_name: str, dm_uuid: str) -> LogicalVolume | None:
    """The LV a mapped device is (its top-level device, not a -real/-cow layer), or None."""
    if not is_lvm_uuid(dm_uuid):
        return None
    vg, lv, layer = split_dm_name(dm_name)
    if not vg or not lv or layer:
        return None
    return get_lv(vg, lv)


def get_lv(vg: str, name: str) -> LogicalVolume | None:
    try:
        rows = _report(f"{vg}/{name}")
    except KernelToolError as exc:
        if "not found" in exc.stderr.lower() or "failed to find" in exc.stderr.lower():
            return None
        raise
    return rows[0] if rows else None


def helper_lv_name(lv_name: str, role: str) -> str:
    """``blocktrack_<lv>_<role>``, shortened so LVM accepts it."""
    return f"{NAME_PREFIX}{lv_name[:_LV_NAME_MAX - len(NAME_PREFIX) - len(role) - 1]}_{role}"


def round_to_extents(size: int, extent_size: int) -> int:
    return -(-size // extent_size) * extent_size


def create_lv(vg: str, name: str, size: int) -> LogicalVolume:
    """A new linear LV of at least ``size`` bytes, tagged ``blocktrack``, active, its start zeroed."""
    _lvm("lvcreate", "--yes", "--zero", "y", "--wipesignatures", "n", "--addtag", TAG,
         "--size", f"{size}b", "--name", name, vg, what=f"create the logical volume {vg}/{name}")
    lv = get_lv(vg, name)
    if lv is None:
        raise DeviceError(f"lvcreate made {vg}/{name} but lvs does not list it")
    return lv


def remove_lv(vg: str, name: str) -> bool:
    """Remove ``vg/name`` if it exists (and is one of ours: tagged); True when something was removed."""
    lv = get_lv(vg, name)
    if lv is None:
        return False
    if TAG not in lv.tags:
        raise DeviceError(f"refusing to remove {vg}/{name}: it does not carry blocktrack's LVM tag")
    _lvm("lvremove", "--yes", f"{vg}/{name}", what=f"remove the logical volume {vg}/{name}")
    return True
