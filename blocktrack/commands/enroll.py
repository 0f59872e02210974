"""``blocktrack enroll``: start tracking the writes to a live device (an LVM logical volume)."""

from __future__ import annotations

import argparse
import sys

from blocktrack import autoenroll, backends
from blocktrack.commands.common import parse_size
from blocktrack.enroll_policy import DEFAULT_POLICY, Policy
from blocktrack.errors import UsageError
from blocktrack.commands.tracking_common import add_common, collected_warnings, emit_json, human_size, state_of

DESCRIPTION = """\
Start tracking which 1 MiB chunks of DEVICE are written, while it stays in use: a mounted
filesystem keeps running and the device keeps its name (/dev/VG/LV). blocktrack copies the
device's device-mapper table to a hidden device (blocktrack-<id>-orig) and swaps the device's
own table, in one suspend/resume of a few milliseconds, for a tracking layer on top of it:

  era       dm-era with 1 MiB blocks; its metadata goes on a small LV blocktrack creates in the
            same volume group (VG/blocktrack_<LV>_era), or on --metadata DEV. Tracking survives
            a restart of blocktrack and a reboot (enroll again after the reboot to re-attach).
  snapshot  a device-mapper snapshot is the checkpoint, and its COW exception table lists what
            changed; two COW volumes (VG/blocktrack_<LV>_cow0, _cow1) take turns. A snapshot
            that overflows its COW volume makes the next pass report every chunk dirty.
  nbd       blocktrack's NBD server, in a detached process, serves the hidden device to the
            kernel's NBD client (/dev/nbdN), and the device is remapped onto /dev/nbdN: every
            write is marked in the server's memory before it is acknowledged. No dm target
            needed; the map does not survive the server (killed, reboot): writes then fail
            with I/O errors, and `blocktrack status` says the server died.

The first checkpoint is 1: `blocktrack dirty DEVICE` lists the chunks written since. Everything
enroll changes is undone if it fails half-way; `blocktrack unenroll DEVICE` puts the original
table back byte for byte. Enrolling a device that is already enrolled does nothing; enrolling
one whose tracking devices are gone (after a reboot) re-attaches them.

Do not let LVM reactivate an enrolled LV (lvchange --refresh, lvextend, lvcreate -s on it):
it would load its own table over blocktrack's and writes would bypass tracking (blocktrack
notices and refuses to answer until you unenroll and enroll again).

With --from-udev, the enrollment policy (--policy, default /etc/blocktrack/enroll.conf) chooses
the backend and its options: DEVICE is a dm name (as the unit blocktrack-enroll@NAME.service
passes it), dm-N or a path, and udev's database says which LV it is; without DEVICE, udev's
environment (a RUN program's DEVNAME, DM_VG_NAME, DM_LV_NAME, ACTION) does. A device no rule
matches, or one of blocktrack's own, is left alone and the exit status is 0. See README,
"Automatic enrollment"."""

EPILOG = """\
examples:
  blocktrack enroll /dev/vg0/data --backend era
  blocktrack enroll /dev/vg0/data --backend era --metadata /dev/vg0/data_meta
  blocktrack enroll /dev/vg0/db --backend snapshot --cow-size 2G --json
  blocktrack enroll /dev/vg0/web --backend nbd
  blocktrack enroll --from-udev vg0-db--1          # what blocktrack-enroll@vg0-db--1.service runs
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("enroll", help="start tracking the writes to a live device",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("device", metavar="DEVICE", nargs="?",
                        help="the device to track: /dev/VG/LV (or /dev/mapper/NAME)")
    parser.add_argument("--backend", choices=sorted(backends.BACKENDS),
                        help="how to track writes: era (dm-era) or snapshot (dm-snapshot COW table); "
                             "required unless --from-udev")
    parser.add_argument("--metadata", metavar="DEV",
                        help="era: put the era metadata on DEV (unused; it is overwritten) instead of a new LV "
                             "in the device's volume group")
    parser.add_argument("--cow-size", type=parse_size, metavar="SIZE",
                        help="snapshot: size of each of the two COW volumes (default: a fifth of the device, "
                             "at least 8 MiB); more than this written between two passes overflows it")
    parser.add_argument("--snapshot-chunk", type=int, metavar="KIB", dest="chunk_kib",
                        help="snapshot: the snapshot's chunk size in KiB (power of two, 4 to 1024; default 64)")
    parser.add_argument("--from-udev", action="store_true",
                        help="enroll as the policy says: DEVICE (a dm name, dm-N or path) or udev's environment "
                             "names the device")
    parser.add_argument("--policy", metavar="FILE",
                        help=f"--from-udev: the enrollment policy (default {DEFAULT_POLICY})")
    add_common(parser, "print the enrolled device's status as one JSON object")
    parser.set_defaults(run=run)


def run(args) -> int:
    backends.interruptible()
    state = state_of(args)
    if args.from_udev:
        return run_from_udev(args, state)
    if args.device is None or args.backend is None:
        raise UsageError("enroll needs DEVICE and --backend (or --from-udev)")
    options = {"metadata": args.metadata, "cow_size": args.cow_size, "chunk_kib": args.chunk_kib}
    with collected_warnings() as warns:
        backend, what = backends.enroll(args.device, args.backend, state, **options)
        status = backend.status()
    if args.json:
        emit_json({"event": what.replace(" ", "_"), "result": "ok", "warnings": warns, **status})
    else:
        hidden = ", ".join(status["hidden_devices"]) or "none"
        helpers = ", ".join(status["helper_volumes"]) or "none"
        sys.stdout.write(f"{status['device']}: {what} ({status['backend']}); {status['chunks']} chunks of "
                         f"{human_size(status['chunk_size'])}; checkpoint {status['checkpoint']}\n"
                         f"  hidden devices: {hidden}\n  helper volumes: {helpers}\n")
    return 0


def run_from_udev(args, state) -> int:
    """The systemd unit's ExecStart: a no-match is a success (exit 0) with a message, not an error."""
    event = autoenroll.event_from_udev(args.device, "add")
    if event.action == "remove":
        outcome = autoenroll.on_removed(event, state)
    else:
        outcome = autoenroll.on_present(event, Policy.load(args.policy), state)
    if args.json:
        emit_json(outcome.as_json())
    else:
        sys.stdout.write(outcome.message + "\n")
    return 0
