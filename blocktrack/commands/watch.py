"""``blocktrack watch``: enroll logical volumes as they appear, for hosts without systemd.

Design note. On a systemd host the udev rule (udev-rules/90-blocktrack.rules) and the unit
blocktrack-enroll@.service do this job; ``watch`` is the same job as one long-running process: a pyudev
monitor on block disks, each event reduced to a ``DeviceEvent`` and handed to ``blocktrack.autoenroll``,
which makes every decision (so the two paths cannot drift apart).

Events are handled one at a time, in order. That is deliberate: enrolling an LV swaps its table and so
sends a "change" event for it, and creates hidden devices and helper LVs that send events of their own;
handled after the enroll finished, the first finds the LV enrolled and the others are filtered out as
blocktrack's own. The kernel queues what arrives meanwhile in the monitor's netlink socket.

The monitor listens to udev's events (after the rules ran, so DM_VG_NAME and friends are set), never the
kernel's raw ones. It starts before the scan of existing devices, so a volume that appears during the
scan is seen by one or the other (possibly both: enrolling twice is a no-op). The policy file is read
again when it changes; a broken edit is reported and the previous policy kept, so a typo does not stop
protection of what already matched.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from blocktrack import autoenroll, backends
from blocktrack.commands.tracking_common import add_common, emit_json, state_of
from blocktrack.enroll_policy import DEFAULT_POLICY, Policy
from blocktrack.errors import BlocktrackError, UsageError

DESCRIPTION = f"""\
Watch udev for logical volumes appearing, changing and going away, and do what the udev rule
and the systemd unit blocktrack-enroll@.service do on a host that has systemd. An LV that the
enrollment policy (--policy, default {DEFAULT_POLICY}) matches is enrolled with
the rule's backend when it appears (or when watch starts, unless --no-scan). An LV that is
removed (lvremove) is unenrolled and blocktrack's helper volumes are removed; an LV that is only
deactivated keeps its era tracking, re-attached when it is activated again. blocktrack's own
devices and LVM's internal layers are never enrolled.

One line is printed per event acted on (--verbose: per event seen). Runs until interrupted
(SIGINT or SIGTERM, exit status 0). Do not run it where the udev rule and the unit are installed
and systemd runs: both would act on the same events (harmless, but twice the work)."""

EPILOG = """\
examples:
  blocktrack watch
  blocktrack watch --policy /etc/blocktrack/enroll.conf --json
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("watch", help="enroll the LVs the policy matches as udev reports them",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", metavar="FILE", help=f"the enrollment policy (default {DEFAULT_POLICY})")
    parser.add_argument("--no-scan", dest="scan", action="store_false",
                        help="do not enroll the LVs that exist already when watch starts; only new events")
    parser.add_argument("--verbose", action="store_true", help="also report events that change nothing")
    add_common(parser, "one JSON object per line for each event acted on")
    parser.set_defaults(run=run)


class _PolicyFile:
    """The policy, read again when the file's mtime or size changes."""

    def __init__(self, path: str | None):
        self.path = path
        self.policy = Policy.load(path)
        self.stamp = self._stamp()

    def _stamp(self):
        try:
            st = os.stat(self.path or DEFAULT_POLICY)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self, report) -> Policy:
        stamp = self._stamp()
        if stamp != self.stamp:
            self.stamp = stamp
            try:
                self.policy = Policy.load(self.path)
                report({"event": "policy_reloaded", "result": "ok", "rules": len(self.policy.rules),
                        "message": f"policy {self.policy.source} read again: {len(self.policy.rules)} rules"})
            except BlocktrackError as exc:
                report({"event": "policy_error", "result": "failed",
                        "message": f"{exc}; keeping the previous policy"})
        return self.policy


def run(args) -> int:
    try:
        import pyudev
    except ImportError:
        raise UsageError("blocktrack watch needs pyudev (pip install pyudev)") from None
    backends.interruptible()              # SIGTERM unwinds an enroll in progress like Ctrl-C
    state = state_of(args)
    policy_file = _PolicyFile(args.policy)

    def report(obj: dict) -> None:
        if args.json:
            emit_json(obj)
        else:
            stream = sys.stderr if obj.get("result") == "failed" else sys.stdout
            stream.write(obj["message"] + "\n")
            stream.flush()

    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context, source="udev")
    monitor.filter_by(subsystem="block", device_type="disk")
    monitor.start()                       # before the scan: nothing falls between the two
    policy = policy_file.policy
    report({"event": "watching", "result": "ok", "policy": policy.source, "rules": len(policy.rules),
            "message": f"watching for logical volumes; policy {policy.source}, {len(policy.rules)} rules"})
    try:
        if args.scan:
            for device in context.list_devices(subsystem="block", DEVTYPE="disk"):
                if device.properties.get("DM_NAME"):
                    _handle(device.properties, "add", policy_file, state, args, report)
        while True:
            device = monitor.poll()
            if device is None:
                continue
            _handle(device.properties, device.action or "change", policy_file, state, args, report)
    except KeyboardInterrupt:
        report({"event": "stopped", "result": "ok", "message": "blocktrack watch: stopped"})
        return 0


def _handle(props, action: str, policy_file: _PolicyFile, state, args, report) -> None:
    event = autoenroll.DeviceEvent.from_properties(props, action)
    started = time.monotonic()
    try:
        if event.action == "remove":
            outcome = autoenroll.on_removed(event, state)
        elif event.action in ("add", "change"):
            outcome = autoenroll.on_present(event, policy_file.current(report), state)
        else:
            return                        # move, online, offline, bind: nothing to do with enrollment
    except BlocktrackError as exc:
        # One LV's failure must not stop the watch over the others; the error is reported and the next
        # event for this LV tries again.
        outcome = autoenroll.Outcome("failed", event.label, f"{event.label}: {event.action}: {exc}")
    quiet = outcome.action in ("skipped", "no match", "excluded", "already enrolled", "not enrolled", "still present")
    if quiet and not args.verbose:
        return
    obj = outcome.as_json()
    obj.update(udev_action=event.action, seconds=round(time.monotonic() - started, 3))
    report(obj)
