"""``blocktrack receive``: write a block-migration stream onto the targets named here."""

from __future__ import annotations

import argparse
import sys

from blocktrack import transport
from blocktrack.commands.common import add_json_flag, device_spec, make_progress, print_summary
from blocktrack.migrate.receiver import receive_stream

DESCRIPTION = """\
Read a QEMU block-migration stream (from `blocktrack send`, or a QEMU 7.2 migration with
the block capability) and write each chunk to the target mapped to its device name.
The stream's envelope (a whole QEMU migration stream, or bare block records) is detected
from its first bytes.

The receiver only writes to targets named with --device, only inside their current size,
and only whole, validated records. Targets must exist (a block device, or an image file
already of the right size: `truncate -s SIZE FILE`). Exit status 0 means the stream
reached its end and every write is on stable storage; anything else leaves the targets
incomplete and says where the stream went wrong."""

EPILOG = """\
examples:
  blocktrack receive --listen 0.0.0.0:7000 --device disk0=/dev/vg1/db
  blocktrack receive --input disk.stream --device disk0=copy.img --expect-full
  qemu ... migrate exec:'blocktrack receive --input - --device drive0=/dev/sdx'
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("receive", help="write a block-migration stream onto targets",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", action="append", required=True, metavar="NAME=PATH", type=device_spec,
                        help="the target for the stream's device NAME (repeatable); other names are refused")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--input", metavar="FILE|-", help="read the stream from FILE, or from stdin with -")
    where.add_argument("--listen", metavar="[HOST]:PORT",
                       help="accept one TCP connection and read the stream from it (HOST defaults to 127.0.0.1; "
                            "port 0 picks a free port, printed on stderr)")
    parser.add_argument("--expect-full", action="store_true",
                        help="fail unless every chunk of every target was written (a full copy)")
    parser.add_argument("--depth", type=int, default=8, metavar="N",
                        help="writes kept in flight per target (default 8)")
    add_json_flag(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    progress = make_progress(args, "receive", False)
    if args.listen:
        listener = transport.Listener(args.listen)
        progress.event("listening", host=listener.host, port=listener.port)
        sys.stderr.write(f"blocktrack receive: listening on {listener.host}:{listener.port}\n")
        sys.stderr.flush()
        source = listener.accept()
    else:
        source = transport.open_source(args.input)
    try:
        summary = receive_stream(source, args.device, progress=progress, depth=args.depth,
                                 expect_full=args.expect_full)
    finally:
        progress.close()
        source.close()
    print_summary(args, "receive", summary.as_dict(), False)
    return 0
