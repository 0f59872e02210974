"""Helpers shared by subcommands: size and socket-mode parsing, output routing, summaries."""

from __future__ import annotations

import argparse
import grp
import json
import re
import sys

from blocktrack.errors import UsageError
from blocktrack.progress import Progress, human_bytes

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``1048576``, ``100M``, ``1.5GiB`` → bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 100M, 2GiB)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(value)


def socket_mode(option: str, mode: str | None, group: str | None) -> tuple[int, int | None]:
    """(file mode, gid) for a Unix socket from ``--...-mode`` and ``--...-group``: mode 0600 by
    default, 0660 when only a group is given; the mode in octal (``660``, ``0660``), permission bits
    only; the group by name or number."""
    gid = None
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise UsageError(f"{option}-group: no group named {group!r}") from None
    if mode is None:
        return (0o600 if gid is None else 0o660), gid
    try:
        value = int(mode, 8)
    except ValueError:
        raise UsageError(f"{option}-mode must be an octal file mode such as 0600 or 0660, not {mode!r}") from None
    if not 0 <= value <= 0o777:
        raise UsageError(f"{option}-mode takes permission bits only (0000 to 0777), not {mode}")
    return value, gid


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="progress and the summary as JSON lines (one object per line) instead of text")


def report_stream(data_on_stdout: bool):
    """Where messages go: stdout, unless stdout carries the migration stream itself."""
    return sys.stderr if data_on_stdout else sys.stdout


def make_progress(args, operation: str, data_on_stdout: bool) -> Progress:
    if args.json:
        return Progress("json", report_stream(data_on_stdout), operation=operation)
    return Progress(Progress.choose(False, sys.stderr), sys.stderr, operation=operation)


def print_summary(args, operation: str, summary: dict, data_on_stdout: bool) -> None:
    out = report_stream(data_on_stdout)
    if args.json:
        out.write(json.dumps({"event": "summary", "operation": operation, "result": "ok", **summary},
                             sort_keys=True) + "\n")
    else:
        rate = summary.get("mb_per_s")
        out.write(f"{operation}: {summary['chunks']} chunks ({summary['zero_chunks']} zero), "
                  f"{human_bytes(summary['device_bytes'])} of device data, "
                  f"{human_bytes(summary['stream_bytes'])} on the wire, {summary['seconds']:.2f} s"
                  + (f", {rate:.1f} MB/s" if rate is not None else "") + "\n")
        for device in summary["devices"]:
            line = f"  {device['name']}: {device['path']} {human_bytes(device['size'])}, {device['chunks']} chunks"
            if "chunks_covered" in device:
                line += f", {device['chunks_covered']}/{device['target_chunks']} target chunks written"
            out.write(line + "\n")
    out.flush()


DEVICE_RULE = ("NAME may hold '=' itself: NAME=PATH is split at the '=' that leaves an existing PATH, and "
               "refused when more than one does; or give --device-name NAME before --device PATH")


class _DeviceNameAction(argparse.Action):
    """``--device-name NAME``: the name of the ``--device`` that follows (held in args.device_name)."""

    def __call__(self, parser, namespace, value, option_string=None):
        if namespace.device_name is not None:
            parser.error(f"--device-name {namespace.device_name} is not followed by a --device PATH")
        namespace.device_name = value


class _DeviceAction(argparse.Action):
    """``--device NAME=PATH`` (DeviceSpec.parse), or ``--device PATH`` after ``--device-name NAME``."""

    def __call__(self, parser, namespace, value, option_string=None):
        from blocktrack.errors import UsageError
        from blocktrack.migrate.sender import DeviceSpec

        name, namespace.device_name = namespace.device_name, None
        try:
            spec = DeviceSpec.parse(value) if name is None else DeviceSpec.named(name, value)
        except UsageError as exc:
            parser.error(f"argument --device: {exc}")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), spec])


def add_device_arguments(parser: argparse.ArgumentParser, help: str) -> None:
    """``--device NAME=PATH`` (repeatable, required) and ``--device-name NAME``; read them back with
    ``named_devices(args)``."""
    parser.add_argument("--device", action=_DeviceAction, required=True, metavar="NAME=PATH",
                        help=f"{help}. {DEVICE_RULE}")
    parser.add_argument("--device-name", action=_DeviceNameAction, default=None, metavar="NAME",
                        help="the name of the --device that follows, which then gives its PATH alone (no "
                             "splitting at '='), e.g. --device-name 'vm=7' --device /dev/vg1/vm7")


def named_devices(args) -> list:
    """The DeviceSpecs of ``--device``, once no ``--device-name`` is left without its ``--device``."""
    from blocktrack.errors import UsageError

    if args.device_name is not None:
        raise UsageError(f"--device-name {args.device_name} is not followed by a --device PATH")
    return args.device


def remote_device_spec(text: str) -> str:
    """argparse type for ``--remote-device NAME=PATH``: checked for its form only and passed on whole,
    since PATH is on the other host (the remote receiver splits it by the same rule)."""
    if "=" not in text.strip("="):
        raise argparse.ArgumentTypeError(f"--remote-device wants NAME=PATH, got {text!r}")
    return text
