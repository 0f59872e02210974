"""``blocktrack status``: what is enrolled and how its tracking is doing."""

from __future__ import annotations

import argparse
import sys

from blocktrack import backends
from blocktrack.commands.tracking_common import add_common, collected_warnings, emit_json, human_size, state_of

DESCRIPTION = """\
Show every enrolled device (or only DEVICE): its backend, its size in chunks, how many chunks
were written since the current checkpoint, the checkpoint, its hidden devices and helper
volumes, and its state:

  tracking   writes are being tracked
  frozen     writes are held (cutover: frozen by blocktrack)
  suspended  writes are held, but not by a freeze: a pass was interrupted between suspend and
             resume, or someone else suspended the device; `dmsetup resume` it
  detached   the tracking devices are gone (after a reboot): `blocktrack enroll` re-attaches
  lost       someone replaced the device's table: writes bypassed tracking
  server-dead  (nbd) the server process is gone: writes fail with I/O errors, the map is
             lost; "reason" says what happened; `blocktrack unenroll` restores the table
  missing    the device no longer exists
  enrolling  an enroll was interrupted: `blocktrack unenroll` cleans up
  retired    `blocktrack release --retire` replaced the table with an error target after a
             verified migration: every write fails; `blocktrack unenroll` removes the rest

Device-mapper devices named blocktrack-* that no record accounts for are listed as orphans."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("status", help="show enrolled devices and their tracking",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("device", metavar="DEVICE", nargs="?", help="only this enrolled device")
    add_common(parser, "one JSON object: {\"state_dir\", \"devices\": [...], \"orphans\": [...]}")
    parser.set_defaults(run=run)


def run(args) -> int:
    state = state_of(args)
    with collected_warnings() as warns:
        chosen = [backends.open_backend(args.device, state)] if args.device else backends.enrolled(state)
        devices = [b.status() for b in chosen]
        orphans = [{"name": d.name, "uuid": d.uuid, "devno": d.devno, "open": d.open_count}
                   for d in backends.orphans(state)] if not args.device else []
    migrations = [] if args.device else migration_status(args.state_dir)
    if args.json:
        emit_json({"state_dir": str(state.path), "devices": devices, "orphans": orphans, "warnings": warns,
                   "migrations": migrations})
        return 0
    if not devices and not orphans:
        sys.stdout.write("no devices enrolled\n")
    for d in devices:
        dirty = "?" if d.get("dirty") is None else d["dirty"]
        sys.stdout.write(f"{d['device']}  {d['backend']}  {d['state']}  {d['chunks']} chunks of "
                         f"{human_size(d['chunk_size'])}  {dirty} dirty since checkpoint {d['checkpoint']}\n")
        sys.stdout.write(f"  id {d['id']}; hidden: {', '.join(d['hidden_devices']) or 'none'}; "
                         f"helpers: {', '.join(d['helper_volumes']) or 'none'}\n")
        if d.get("warning"):
            sys.stdout.write(f"  warning: {d['warning']}\n")
    for m in migrations:
        if m["role"] == "source":
            live = m.get("live") or {}
            progress = live.get("progress") or {}
            where = (f"{live.get('phase', m['phase'])} {progress.get('percent', '')}% pass {progress.get('pass', '')}"
                     if live else f"{m['phase']} (not running)")
            sys.stdout.write(f"migration {m['migration_id']}: {m['device']} → {m['to']} ({m['backend']}): {where}\n")
        else:
            sys.stdout.write(f"receiving {m['device']} (migration {m['migration_id']}) onto {m['target']}: "
                             f"{m['status']}\n")
    for o in orphans:
        sys.stdout.write(f"orphan: {o['name']} ({o['uuid']}, {o['devno']}, open {o['open']}): left by an "
                         "interrupted blocktrack; remove it with dmsetup remove when nothing uses it\n")
    return 0


def migration_status(state_dir: str | None) -> list[dict]:
    """Migrations recorded in the state directory; a running sender is asked for its live phase."""
    from blocktrack.errors import BlocktrackError
    from blocktrack.migrate import control
    from blocktrack.migrate.savedstate import recorded_migrations, state_root

    sources, targets = recorded_migrations(state_root(state_dir))
    out = []
    for s in sources:
        entry = {"role": "source", "migration_id": s.migration_id, "device": s.device, "name": s.name,
                 "to": s.to, "backend": s.backend, "phase": s.phase, "attempt": s.attempt, "pid": s.pid,
                 "bytes_sent": s.bytes_sent, "size": s.size, "live": None}
        result = getattr(s, "result", None)
        if isinstance(result, dict) and "chunks_verified" in result:
            # How much of the device the verdict covers: every chunk, by the digest maps or (full) by
            # reading both devices again.
            entry["verification"] = {"result": result.get("result"), "chunks_compared": result["chunks_verified"],
                                     "chunks": result.get("chunks"), "verify": result.get("verify"),
                                     "verified_by": result.get("verified_by")}
        if s.control_socket and s.pid and _alive(s.pid):
            try:
                entry["live"] = control.request(s.control_socket, {"op": "status"}, timeout=5.0)
            except BlocktrackError as exc:
                entry["live_error"] = str(exc)
        out.append(entry)
    for t in targets:
        entry = {"role": "target", "migration_id": t.migration_id, "device": t.device, "target": t.target,
                 "size": t.size, "status": t.status, "attempt": t.attempt}
        if t.error:
            entry["error"] = t.error               # why it stopped ("interrupted", "failed")
        if t.overwritten:
            entry["overwritten"] = t.overwritten   # written outside the migration: no resume
        out.append(entry)
    return out


def _alive(pid: int) -> bool:
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
