"""``blocktrack receive``: write a block-migration stream onto the targets named here."""

from __future__ import annotations

import argparse
import sys

import json

from blocktrack import transport
from blocktrack.commands.common import add_json_flag, device_spec, make_progress, print_summary
from blocktrack.errors import UsageError
from blocktrack.migrate.live_receiver import serve_migration
from blocktrack.migrate.receiver import receive_stream
from blocktrack.migrate.savedstate import state_root
from blocktrack.wire.control import HELLO_MAGIC

DESCRIPTION = """\
Read a QEMU block-migration stream (from `blocktrack send`, or a QEMU 7.2 migration with
the block capability) and write each chunk to the target mapped to its device name.
The stream's envelope (a whole QEMU migration stream, or bare block records) is detected
from its first bytes.

The receiver only writes to targets named with --device, only inside their current size,
and only whole, validated records. Targets must exist (a block device, or an image file
already of the right size: `truncate -s SIZE FILE`). Exit status 0 means the stream
reached its end and every write is on stable storage; anything else leaves the targets
incomplete and says where the stream went wrong.

A connection from `blocktrack migrate` (a live migration: it starts with blocktrack's own
handshake) is refused before any data moves when the target is smaller than the source,
is acknowledged as it arrives so the sender can resume after a cut, and ends with digests of
what was written, checked by the sender against its frozen source: exit status 0 then means
"verified". What this end has of an unfinished migration is kept in the state folder, so a
restarted receiver accepts the resumed migration (and no other) on the same target."""

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
    parser.add_argument("--state-dir", metavar="DIR",
                        help="live migrations: blocktrack's state directory; what each target holds is kept in "
                             "its migrations/ folder (default $BLOCKTRACK_STATE_DIR, else /var/lib/blocktrack)")
    add_json_flag(parser)
    parser.set_defaults(run=run)


class _Prefixed:
    """A source whose first bytes were already read (to tell a migration from a plain stream)."""

    def __init__(self, head: bytes, inner):
        self.head = memoryview(head)
        self.inner = inner

    def readinto(self, buf) -> int:
        if self.head.nbytes:
            n = min(len(buf), self.head.nbytes)
            memoryview(buf).cast("B")[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        return self.inner.readinto(buf)


def _read_head(source, n: int) -> bytes:
    head = bytearray(n)
    view = memoryview(head)
    got = 0
    while got < n:
        k = source.readinto(view[got:])
        if not k:
            break
        got += k
    return bytes(head[:got])


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
        head = _read_head(source, len(HELLO_MAGIC))
        if head == HELLO_MAGIC:
            if not args.listen:
                raise UsageError("this is a live-migration connection from `blocktrack migrate`: it needs "
                                 "--listen (the receiver answers the sender)")
            summary = serve_migration(source.sock, head, args.device, state_root=state_root(args.state_dir),
                                      progress=progress, depth=args.depth)
        else:
            summary = receive_stream(_Prefixed(head, source), args.device, progress=progress, depth=args.depth,
                                     expect_full=args.expect_full)
    finally:
        progress.close()
        source.close()
    if head == HELLO_MAGIC:
        _print_migration(args, summary)
    else:
        print_summary(args, "receive", summary.as_dict(), False)
    return 0


def _print_migration(args, summary: dict) -> None:
    if args.json:
        sys.stdout.write(json.dumps({"event": "summary", "operation": "receive", **summary}, sort_keys=True) + "\n")
    else:
        sys.stdout.write(f"receive: VERIFIED: migration {summary['migration_id']} of {summary['device']!r} onto "
                         f"{summary['target']}, attempt {summary['attempt']}: {summary['chunks']} chunks written "
                         f"({summary['zero_chunks']} zero), {summary['chunks_held']}/{summary['target_chunks']} "
                         f"chunks held, {summary['chunks_verified']} verified by digest ({summary['verify']}), "
                         f"{summary['seconds']:.2f} s\n")
    sys.stdout.flush()
