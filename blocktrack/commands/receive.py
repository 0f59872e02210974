"""``blocktrack receive``: write a block-migration stream onto the targets named here."""

from __future__ import annotations

import argparse
import sys

import json

from blocktrack import secure, transport
from blocktrack.commands.common import add_device_arguments, add_json_flag, make_progress, named_devices, print_summary
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
restarted receiver accepts the resumed migration (and no other) on the same target.
A target already being written by another `blocktrack receive` is refused (an flock on it).

Security: --listen binds to 127.0.0.1 unless an address is named, and the sender must
authenticate before any byte of the stream is read: TLS 1.3 with certificates on both sides
(--tls-cert/--tls-key/--tls-ca), or a pre-shared key (--psk-file). Plain TCP needs --insecure.
A connection that fails authentication is refused (reported, nothing read) and the receiver
goes on listening for the sender that can authenticate. Connections are authenticated side by
side, each within --handshake-timeout; over --max-handshakes-per-address (or --max-handshakes)
the oldest handshake makes way for the newest, so connections that never authenticate cannot
keep the sender out. The first connection that authenticates is the one read; the others are closed.
Over ssh (`migrate --to ssh://HOST`) the sender runs `blocktrack receive --input -` here
itself; ssh authenticates, and the replies go back on stdout. A sender that sends nothing
for --stall-timeout seconds (keep-alives count) ends the receive with exit status 5."""

EPILOG = """\
examples:
  blocktrack receive --listen 0.0.0.0:7000 --device disk0=/dev/vg1/db \\
      --tls-cert target.pem --tls-key target.key --tls-ca ca.pem
  blocktrack receive --listen 10.0.0.2:7000 --device disk0=/dev/vg1/db --psk-file /etc/blocktrack/psk
  blocktrack receive --listen :7000 --device disk0=copy.img --insecure      # loopback, plain TCP
  blocktrack receive --input disk.stream --device disk0=copy.img --expect-full
  blocktrack receive --input - --device vg0/db=/dev/vg1/db   # what `migrate --to ssh://` runs remotely
  qemu ... migrate exec:'blocktrack receive --input - --device drive0=/dev/sdx'
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("receive", help="write a block-migration stream onto targets",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser, "the target for the stream's device NAME (repeatable); other names are refused")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--input", metavar="FILE|-", help="read the stream from FILE, or from stdin with -")
    where.add_argument("--listen", metavar="[HOST]:PORT",
                       help="accept one authenticated TCP connection and read the stream from it (HOST defaults to "
                            "127.0.0.1, "
                            "loopback only: name an address, e.g. 0.0.0.0:7000, to be reachable from elsewhere; "
                            "port 0 picks a free port, printed on stderr). Needs --tls-*, --psk-file or "
                            "--insecure")
    parser.add_argument("--expect-full", action="store_true",
                        help="fail unless every chunk of every target was written (a full copy)")
    parser.add_argument("--tail-padding", action="store_true",
                        help="plain streams: treat the bytes of the last chunk past a target's end as padding, "
                             "as QEMU's own loader does (QEMU 7.2 sends whatever its buffer held there, for a "
                             "device that is not a whole number of MiB). Without it they must be zero: "
                             "non-zero bytes there could be data of a source larger than the target")
    parser.add_argument("--depth", type=int, default=8, metavar="N",
                        help="writes kept in flight per target (default 8)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="live migrations: blocktrack's state directory; what each target holds is kept in "
                             "its migrations/ folder (default $BLOCKTRACK_STATE_DIR, else /var/lib/blocktrack)")
    secure.add_arguments(parser, receiver=True)
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
    devices = named_devices(args)
    sec = secure.from_args(args, tcp=bool(args.listen))
    progress = make_progress(args, "receive", False) if args.listen else None
    if args.listen:
        listener = transport.Listener(args.listen)
        progress.event("listening", host=listener.host, port=listener.port, auth=sec.mode)
        sys.stderr.write(f"blocktrack receive: listening on {listener.host}:{listener.port} ({sec.mode})\n")
        sys.stderr.flush()
        def refused(reason: str) -> None:
            progress.event("refused", message=reason)
            sys.stderr.write(f"blocktrack receive: refused a connection: {reason}; still listening\n")
            sys.stderr.flush()

        # Authentication first: nothing of the stream is read before the peer proved who it is.
        source = secure.accept_channel(listener, sec, on_refused=refused)
    else:
        source = transport.open_source(args.input)
    stdio_migration = False
    try:
        head = _read_head(source, len(HELLO_MAGIC))
        if head == HELLO_MAGIC:
            if args.listen:
                channel = source
            elif args.input == "-":
                # `migrate --to ssh://` runs us like this: the stream on stdin, our replies on stdout.
                stdio_migration = True
                channel = transport.PipeChannel(sys.stdin.fileno(), sys.stdout.fileno(), "stdio",
                                                stall_timeout=sec.stall_timeout, peer="the sender")
            else:
                raise UsageError("this is a live-migration connection from `blocktrack migrate`: it needs "
                                 "--listen, or --input - with the replies on stdout (as `migrate --to ssh://` "
                                 "runs it): the receiver answers the sender")
            if progress is None:
                progress = make_progress(args, "receive", stdio_migration)
            try:
                summary = serve_migration(channel, head, devices, state_root=state_root(args.state_dir),
                                          progress=progress, depth=args.depth)
            finally:
                if stdio_migration:
                    channel.close()
        else:
            if progress is None:
                progress = make_progress(args, "receive", False)
            summary = receive_stream(_Prefixed(head, source), devices, progress=progress, depth=args.depth,
                                     expect_full=args.expect_full, tail_padding=args.tail_padding,
                                     state_root=state_root(args.state_dir))
    finally:
        if progress is not None:
            progress.close()
        source.close()
    if head == HELLO_MAGIC:
        _print_migration(args, summary, sys.stderr if stdio_migration else sys.stdout)
    else:
        print_summary(args, "receive", summary.as_dict(), False)
    return 0


def _print_migration(args, summary: dict, out) -> None:
    if args.json:
        out.write(json.dumps({"event": "summary", "operation": "receive", **summary}, sort_keys=True) + "\n")
    else:
        out.write(f"receive: VERIFIED: migration {summary['migration_id']} of {summary['device']!r} onto "
                         f"{summary['target']}, attempt {summary['attempt']}: {summary['chunks']} chunks written "
                         f"({summary['zero_chunks']} zero), {summary['chunks_held']}/{summary['target_chunks']} "
                         f"chunks held, {summary['chunks_verified']} verified by digest ({summary['verify']}), "
                         f"{summary['seconds']:.2f} s\n")
    out.flush()
