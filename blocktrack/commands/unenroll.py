"""``blocktrack unenroll``: stop tracking a device and put its original table back."""

from __future__ import annotations

import argparse
import sys

from blocktrack import autoenroll, backends
from blocktrack.errors import UsageError
from blocktrack.commands.tracking_common import add_common, emit_json, state_of

DESCRIPTION = """\
Stop tracking DEVICE: load its original device-mapper table again (byte for byte what
`dmsetup table` showed before enroll), with a suspend/resume of a few milliseconds and without
unmounting anything; then remove the hidden devices and the helper volumes blocktrack created,
and forget the device. Works from any state an interrupted enroll or pass may have left,
and after a reboot. DEVICE may also be the enrollment id `blocktrack status` shows.

With --from-udev (the ExecStop of blocktrack-enroll@NAME.service, after udev reported the
device removed), DEVICE is a dm name and blocktrack lets go only if the device is really gone:
an LV that was removed is unenrolled and its helper volumes removed; an LV that was only
deactivated keeps its enrollment (era re-attaches when it is activated again). A device that
still exists, or one that is not enrolled, is left alone and the exit status is 0."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("unenroll", help="stop tracking a device, restoring it exactly",
                                   description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("device", metavar="DEVICE", nargs="?",
                        help="an enrolled device (/dev/VG/LV) or enrollment id")
    parser.add_argument("--from-udev", action="store_true",
                        help="react to a remove event: DEVICE (a dm name) or udev's environment names the device")
    add_common(parser, "print what was done as one JSON object")
    parser.set_defaults(run=run)


def run(args) -> int:
    backends.interruptible()
    if args.from_udev:
        outcome = autoenroll.on_removed(autoenroll.event_from_udev(args.device, "remove"), state_of(args))
        if args.json:
            emit_json(outcome.as_json())
        else:
            sys.stdout.write(outcome.message + "\n")
            for note in outcome.notes:
                sys.stdout.write(f"  {note}\n")
        return 0
    if args.device is None:
        raise UsageError("unenroll needs DEVICE (or --from-udev)")
    record, notes = backends.unenroll(args.device, state_of(args))
    if args.json:
        emit_json({"event": "unenrolled", "result": "ok", "device": record["device"], "id": record["id"],
                   "backend": record["backend"], "actions": notes})
    else:
        sys.stdout.write(f"{record['device']}: unenrolled ({record['backend']})\n")
        for note in notes:
            sys.stdout.write(f"  {note}\n")
    return 0
