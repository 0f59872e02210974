"""Helpers shared by subcommands: size parsing, output routing, summaries."""

from __future__ import annotations

import argparse
import json
import re
import sys

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


def device_spec(text: str):
    """argparse type for ``NAME=PATH`` (argparse reports ArgumentTypeError as a usage error)."""
    from blocktrack.errors import UsageError
    from blocktrack.migrate.sender import DeviceSpec

    try:
        return DeviceSpec.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
