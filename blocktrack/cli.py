"""The ``blocktrack`` command line: a thin layer that parses arguments and calls the modules below.

Errors: every BlocktrackError is printed as one line, ``blocktrack: error: <what> (<where>)``, and
the process exits with the error's exit code (see README, "Exit codes"). Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from blocktrack import __version__
from blocktrack.commands import dirty, enroll, migrate, receive, release, send, serve, status, unenroll, watch
from blocktrack.errors import BlocktrackError

COMMANDS = (send, receive, serve, migrate, release, enroll, unenroll, status, dirty, watch)

DESCRIPTION = """\
blocktrack tracks the writes to live Linux block devices and moves them to another host
in QEMU's block-migration stream format, converging to a short, verified cutover."""

EXIT_CODES = """\
exit status:
  0  success
  1  other error
  2  usage: bad arguments, a missing or unusable path
  3  stream: malformed or incomplete migration stream (targets are incomplete)
  4  device: a read, write or size problem on a device
  5  peer: the other end went away or misbehaved
  6  verification: the target does not match the frozen source (migrate, receive)
  7  not converging: the writers outpace the link (migrate --on-no-converge stop)
  130 interrupted
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blocktrack", description=DESCRIPTION, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"blocktrack {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Die quietly on a closed stdout pipe in the middle of `send --output -`, like other Unix tools
    # would, but through our PeerError path: ignore SIGPIPE so write() returns EPIPE.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BlocktrackError as exc:
        _report_error(args, exc)
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("blocktrack: interrupted\n")
        return 130


def _report_error(args, exc: BlocktrackError) -> None:
    message = str(exc)
    if args.command == "receive":
        message += "; the targets are incomplete"
    if getattr(args, "json", False):
        record = {"event": "error", "operation": args.command, "result": "failed",
                  "error": type(exc).__name__, "message": message}
        for attr in ("offset", "device", "path", "errno"):
            value = getattr(exc, attr, None)
            if value is not None:
                record[attr] = value
        out = sys.stderr if getattr(args, "output", None) == "-" else sys.stdout
        out.write(json.dumps(record, sort_keys=True) + "\n")
        out.flush()
    sys.stderr.write(f"blocktrack: error: {message}\n")
    sys.stderr.flush()
