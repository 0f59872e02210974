"""``blocktrack dirty``: the chunks written since a checkpoint; starts a new checkpoint."""

from __future__ import annotations

import argparse
import sys

from blocktrack import backends
from blocktrack.commands.tracking_common import add_common, collected_warnings, emit_json, human_size, state_of

DESCRIPTION = """\
List the chunks of an enrolled DEVICE written since a checkpoint (default: the checkpoint the
previous `dirty` returned; the first is 1, the moment of enrollment), and start a new checkpoint:
the next call lists what is written from now on. Every write acknowledged after the checkpoint
is listed (chunks may be listed that were not written: the false positives of 1 MiB granularity
and of the backend's own bookkeeping, never a missed write). When a backend has lost track (an
overflowed snapshot) every chunk is listed, with a warning.

--json prints {"chunk_size": bytes, "checkpoint": the checkpoint this call starts, "since": ...,
"dirty": [[first_chunk, last_chunk], ...] (inclusive ranges), "count": ..., "chunks": ...,
"warnings": [...]}."""

EPILOG = """\
examples:
  blocktrack dirty /dev/vg0/data --json
  blocktrack dirty /dev/vg0/data --since 7
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("dirty", help="list the chunks written since a checkpoint",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("device", metavar="DEVICE", help="an enrolled device (/dev/VG/LV) or enrollment id")
    parser.add_argument("--since", type=int, metavar="CHECKPOINT",
                        help="list the writes since this earlier checkpoint (default: the latest)")
    add_common(parser, "one JSON object (see above)")
    parser.set_defaults(run=run)


def run(args) -> int:
    backends.interruptible()
    backend = backends.open_backend(args.device, state_of(args))
    since = backend.checkpoint if args.since is None else args.since
    with collected_warnings() as warns:
        dirty, checkpoint = backend.dirty_since(args.since)
    ranges = dirty.ranges()
    count = dirty.count()
    if args.json:
        emit_json({"device": backend.device, "backend": backend.name, "chunk_size": dirty.chunk_size,
                   "chunks": dirty.nchunks, "since": since, "checkpoint": checkpoint, "count": count,
                   "dirty": ranges, "warnings": warns})
        return 0
    sys.stdout.write(f"{backend.device}: {count} of {dirty.nchunks} chunks ({human_size(dirty.chunk_size)}) "
                     f"written since checkpoint {since}; new checkpoint {checkpoint}\n")
    for first, last in ranges:
        sys.stdout.write(f"  {first}\n" if first == last else f"  {first}-{last}\n")
    return 0
