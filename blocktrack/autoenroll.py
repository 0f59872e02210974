"""Automatic enrollment: what to do when udev reports a logical volume appearing, changing or going away.

Design note. Two drivers call this module and must behave the same: the systemd unit
``blocktrack-enroll@<dm name>.service`` that ``udev-rules/90-blocktrack.rules`` wants (``blocktrack enroll
--from-udev`` / ``unenroll --from-udev``), and ``blocktrack watch`` (a pyudev monitor, for hosts without
systemd). Both reduce an event to a ``DeviceEvent`` (the udev properties that matter) and call
``on_present`` or ``on_removed``; every decision is made here, every kernel change by ``backends``.

Which events count (the udev rule applies the same filter first; we apply it again because ``watch`` has
no rule in front of it, and because an operator may run ``--from-udev`` by hand):
  * only dm devices that LVM's rules named as a logical volume (DM_VG_NAME and DM_LV_NAME set);
  * not LVM's internal layers (DM_LV_LAYER: -real, -cow, -tpool), nor devices LVM asks other rules to
    leave alone (DM_UDEV_DISABLE_OTHER_RULES_FLAG=1: hidden sub-LVs like _tmeta, the bare "add" an
    activation sends before its table is loaded), nor a suspended device (opening it would hang);
  * LVM's NOSCAN event (DM_NOSCAN=1: a new LV whose start LVM is about to zero) sets that flag only for
    the zeroing and keeps the real value in DM_DISABLE_OTHER_RULES_FLAG_OLD until the next event -- which
    udev's inotify watch sends, or not (in the kernel lab a new LV's last event was sometimes the NOSCAN
    one). So for NOSCAN events the saved value decides. Enrolling cannot race the zeroing: it asks LVM
    about the LV (lvs, which waits for the VG lock lvcreate holds) before touching the table;
  * never blocktrack's own devices: hidden dm devices (name ``blocktrack-*``, UUID ``BLOCKTRACK-*``) and
    helper LVs (``blocktrack_*``). Enrolling creates such devices; reacting to them would loop.
Enrolling an LV swaps its table, which resumes it and sends a "change" event for the LV itself: that
event finds the LV already enrolled and does nothing.

What a remove means (seen in the kernel lab, LVM 2.03.16): LVM happily deactivates or removes an
enrolled LV. ``lvchange -an``/``vgchange -an`` and ``lvremove`` both remove the LV's top dm device (and
deactivate our helper LV with it) but leave our hidden device, which still maps the LV's extents; after
``lvremove`` those extents are free for the next LV. So on a remove event we always take the hidden
devices down, and then:
  * the LV is gone from LVM (lvremove): unenroll fully -- the helper LVs are removed, the record forgotten;
  * the LV still exists (it was deactivated, e.g. at shutdown) and its backend can re-attach (era): keep
    the record and the helper LVs; when the LV is activated again its "change" event re-attaches with the
    writes recorded so far (we activate the helper LVs first; LVM does not know they belong together);
  * the LV still exists but its backend cannot re-attach (snapshot): unenroll fully; the next activation
    enrolls afresh if the policy still says so.
A remove event for a device that still exists (a stale event, or a name reused at once) changes nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Mapping

from blocktrack import backends
from blocktrack.backends.base import Backend
from blocktrack.enroll_policy import Policy, is_own_dm, is_own_lv
from blocktrack.errors import UsageError
from blocktrack.kernel import dm, lvm
from blocktrack.kernel._command import run_tool
from blocktrack.state import StateDir


@dataclass(frozen=True)
class DeviceEvent:
    """The udev properties of one block device event that enrollment looks at."""

    action: str
    devname: str
    dm_name: str = ""
    dm_uuid: str = ""
    vg: str = ""
    lv: str = ""
    lv_layer: str = ""
    disable_other_rules: bool = False
    suspended: bool = False
    noscan: bool = False
    #: DM_DISABLE_OTHER_RULES_FLAG_OLD: the flag's real value while NOSCAN overrides it
    disable_other_rules_saved: bool = False

    @classmethod
    def from_properties(cls, props: Mapping[str, str], action: str | None = None) -> "DeviceEvent":
        return cls(action=action or props.get("ACTION", "") or "change", devname=props.get("DEVNAME", ""),
                   dm_name=props.get("DM_NAME", ""), dm_uuid=props.get("DM_UUID", ""),
                   vg=props.get("DM_VG_NAME", ""), lv=props.get("DM_LV_NAME", ""),
                   lv_layer=props.get("DM_LV_LAYER", ""),
                   disable_other_rules=props.get("DM_UDEV_DISABLE_OTHER_RULES_FLAG") == "1",
                   suspended=props.get("DM_SUSPENDED") == "1", noscan=props.get("DM_NOSCAN") == "1",
                   disable_other_rules_saved=props.get("DM_DISABLE_OTHER_RULES_FLAG_OLD") == "1")

    @property
    def label(self) -> str:
        if self.vg and self.lv:
            return f"{self.vg}/{self.lv}"
        return self.dm_name or self.devname or "?"


@dataclass
class Outcome:
    """What handling one event did. ``action``: enrolled, reattached, already enrolled, skipped, no match,
    excluded, unenrolled, deactivated, not enrolled, still present, failed."""

    action: str
    device: str
    message: str
    rule: str | None = None
    backend: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        out = {"event": self.action.replace(" ", "_"), "device": self.device, "message": self.message,
               "result": "failed" if self.action == "failed" else "ok"}
        if self.rule:
            out["rule"] = self.rule
        if self.backend:
            out["backend"] = self.backend
        if self.notes:
            out["actions"] = self.notes
        return out


def skip_reason(ev: DeviceEvent) -> str | None:
    """Why this event must not lead to enrollment (None: it may). The same filter as the udev rule."""
    if not ev.dm_name:
        return "not a device-mapper device"
    if is_own_dm(ev.dm_name, ev.dm_uuid) or is_own_lv(ev.lv):
        return "one of blocktrack's own devices"
    if not (ev.vg and ev.lv):
        return "not an LVM logical volume"
    if ev.lv_layer:
        return f"an LVM internal layer ({ev.lv_layer})"
    if ev.action != "remove":
        if ev.suspended:
            return "suspended"
        if ev.disable_other_rules_saved if ev.noscan else ev.disable_other_rules:
            return "LVM asked udev rules to leave it alone (DM_UDEV_DISABLE_OTHER_RULES_FLAG)"
    return None


# -- reading udev's view of a device ---------------------------------------------------------------

def unescape_instance(instance: str) -> str:
    """A systemd instance name back to the dm name: systemd mangles characters a unit name cannot hold
    (``+`` becomes ``\\x2b``) and %i passes them on escaped. We do not use %I: it also turns ``-`` into
    ``/``, and dm names are full of ``-``."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), instance)


def device_node_for(name: str) -> str:
    """A device argument of ``--from-udev``: a path, ``dm-N``, or a dm name (a unit instance)."""
    if name.startswith("/"):
        return name
    name = unescape_instance(name)
    if re.fullmatch(r"dm-\d+", name):
        return f"/dev/{name}"
    return f"/dev/mapper/{name}"


def udev_properties(node: str) -> dict[str, str] | None:
    """``udevadm info --query=property`` of ``node``; None when udev does not know it (gone)."""
    try:
        proc = subprocess.run(["udevadm", "info", "--query=property", f"--name={node}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=60, close_fds=True)
    except FileNotFoundError:
        raise UsageError("udevadm not found: --from-udev needs udev (install the udev package)") from None
    if proc.returncode != 0:
        return None
    props = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key] = value
    return props


def event_from_udev(device: str | None, action: str, environ: Mapping[str, str] | None = None) -> DeviceEvent:
    """The event ``--from-udev`` handles: with ``device``, udev's database for it (or, when it is gone,
    what its dm name says); without, the udev environment of a RUN program (ACTION, DEVNAME, DM_*)."""
    environ = os.environ if environ is None else environ
    if device is None:
        if not environ.get("DEVNAME") and not environ.get("DM_NAME"):
            raise UsageError("--from-udev without DEVICE needs udev's environment (DEVNAME, DM_NAME, ...): "
                             "run it from a udev rule, or name the device (dm name, dm-N or path)")
        return DeviceEvent.from_properties(environ, environ.get("ACTION") or action)
    node = device_node_for(device)
    props = udev_properties(node) if os.path.exists(node) else None
    if props is not None:
        return DeviceEvent.from_properties(props, action)
    # Gone (the unit is stopped after the remove event): the dm name alone says which LV it was.
    dm_name = unescape_instance(device) if not device.startswith("/") else ""
    if node.startswith("/dev/mapper/"):
        dm_name = node[len("/dev/mapper/"):]
    vg, lv, layer = lvm.split_dm_name(dm_name) if dm_name and not dm_name.startswith("dm-") else ("", "", "")
    return DeviceEvent(action=action, devname=node, dm_name=dm_name, vg=vg, lv=lv, lv_layer=layer)


# -- the decisions -----------------------------------------------------------------------------------

def _lv_tags(vg: str, lv: str) -> tuple[str, ...]:
    found = lvm.get_lv(vg, lv)
    return found.tags if found else ()


def _record_for(state: StateDir, dm_name: str) -> dict | None:
    for record in state.records():
        if record.get("dm_name") == dm_name:
            return record
    return None


def on_present(ev: DeviceEvent, policy: Policy, state: StateDir) -> Outcome:
    """An add or change event: enroll the LV if the policy says so and it is not enrolled yet."""
    reason = skip_reason(ev)
    if reason:
        return Outcome("skipped", ev.label, f"{ev.label}: {reason}")
    # Enrolled already (the change event our own table swap causes, and any later one): answer from the
    # record and device-mapper alone; the full enroll path asks LVM, which costs seconds on a slow host.
    record = _record_for(state, ev.dm_name)
    if record is not None:
        existing = backends.open_backend(record["id"], state)
        if existing.tracking_state()[0] in ("tracking", "frozen", "suspended"):
            return Outcome("already enrolled", existing.device, f"{existing.device}: already enrolled "
                           f"({record['backend']})", backend=record["backend"])
    tags = _lv_tags(ev.vg, ev.lv) if policy.needs_tags else ()
    rule = policy.match(ev.vg, ev.lv, tags)
    if rule is None:
        return Outcome("no match", ev.label, f"{ev.label}: no rule in {policy.source} matches; not enrolled")
    if rule.backend == "none":
        return Outcome("excluded", ev.label, f"{ev.label}: rule [{rule.name}] says backend = none; not enrolled",
                       rule=rule.name)
    node = ev.devname or f"/dev/mapper/{ev.dm_name}"
    if record is not None:
        _activate_helpers(record)
    options = {"metadata": None, "cow_size": None, "chunk_kib": None, **rule.options}
    backend, what = backends.enroll(node, rule.backend, state, **options)
    return Outcome(what, backend.device, f"{backend.device}: {what} ({rule.backend}, rule [{rule.name}])",
                   rule=rule.name, backend=rule.backend)


def _activate_helpers(record: dict) -> None:
    """Activate the helper LVs of a deactivated enrollment, so that re-attaching finds its metadata. LVM
    deactivates them with the LV (they sit below it in the dm tree) but activates only what it is asked."""
    for helper in record.get("created_lvs") or []:
        found = lvm.get_lv(helper["vg"], helper["name"])
        if found is not None and lvm.TAG in found.tags and not os.path.exists(found.path or "/nonexistent"):
            run_tool(["lvm", "lvchange", "--activate", "y", f"{helper['vg']}/{helper['name']}"],
                     what=f"activate the helper volume {helper['vg']}/{helper['name']}")


def on_removed(ev: DeviceEvent, state: StateDir) -> Outcome:
    """A remove event: let go of the LV (see the module docstring for deactivated versus removed)."""
    if not ev.dm_name or is_own_dm(ev.dm_name, ev.dm_uuid) or is_own_lv(ev.lv) or ev.lv_layer:
        return Outcome("skipped", ev.label, f"{ev.label}: not an enrollable device")
    record = _record_for(state, ev.dm_name)
    if record is None:
        return Outcome("not enrolled", ev.label, f"{ev.label}: not enrolled; nothing to do")
    backend = backends.open_backend(record["id"], state)
    if backend.current_device() is not None:
        return Outcome("still present", backend.device, f"{backend.device}: still present; left enrolled "
                       "(`blocktrack unenroll` stops tracking a device that exists)")
    lv = record.get("lv") or {}
    still_in_lvm = bool(lv) and lvm.get_lv(lv["vg"], lv["name"]) is not None
    if still_in_lvm and _can_reattach(backend):
        notes = _remove_hidden(backend)
        return Outcome("deactivated", backend.device,
                       f"{backend.device}: deactivated; tracking resumes when it is activated again",
                       backend=record["backend"], notes=notes)
    record, notes = backends.unenroll(record["id"], state)
    why = "deactivated" if still_in_lvm else "removed"
    return Outcome("unenrolled", record["device"], f"{record['device']}: {why}; unenrolled",
                   backend=record["backend"], notes=notes)


def _can_reattach(backend: Backend) -> bool:
    return type(backend).reattach is not Backend.reattach


def _remove_hidden(backend: Backend) -> list[str]:
    """Remove the enrollment's hidden dm devices (top first: retry while one still holds another)."""
    notes = []
    with backend.state.lock(backend.ident):
        pending = dm.devices_of(backend.ident)
        for _round in range(len(pending) + 1):
            if not pending:
                break
            left = []
            for dev in pending:
                if dev.open_count:
                    left.append(dev)
                    continue
                dm.remove(dev.name)
                notes.append(f"removed the hidden device {dev.name}")
            if len(left) == len(pending):
                names = ", ".join(d.name for d in left)
                raise UsageError(f"{backend.device}: hidden devices still in use: {names}")
            pending = [d for d in (dm.info(x.name) for x in left) if d is not None]
    return notes
