"""``blocktrack serve``: serve a device or image file over NBD, tracking the chunks clients write."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from urllib.parse import quote

from blocktrack import transport
from blocktrack.commands.common import parse_size, socket_mode
from blocktrack.errors import UsageError
from blocktrack.migrate.savedstate import invalidate_target_record, state_root
from blocktrack.nbd import protocol as p
from blocktrack.nbd.export import Export
from blocktrack.nbd.metacontext import DIRTY_BITMAP
from blocktrack.nbd.server import (DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_INFLIGHT,
                                   DEFAULT_MAX_INFLIGHT_PER_CONNECTION, NbdServer)
from blocktrack.progress import human_bytes

DESCRIPTION = f"""\
Serve a block device or image file to NBD clients (qemu, nbdcopy, nbdinfo, fio, nbd-client,
a backup tool) and record which 1 MiB chunks they change. Every write, trim and write-zeroes
is marked in the dirty map before the client is told it succeeded; clients read the map as
the NBD metadata context `{DIRTY_BITMAP}` (flag 1 = dirty, QEMU's convention), and
`base:allocation` reports the holes of image files.

Devices are opened with O_DIRECT where requests are aligned (the page cache otherwise), and
block devices exclusively (O_EXCL) unless --read-only: a mounted device is refused. The
export's size is fixed when the server starts. Many clients may connect, one after another
or at once (the export allows multi-conn: a flush on one connection covers all).

Limits: at most --max-connections clients are served at once (more wait to be accepted
until one leaves), and request data held in memory (READ and WRITE buffers) never exceeds
--max-inflight in all nor --max-inflight-per-connection for one client: a client that
sends faster than it reads its replies is slowed down, not buffered without end. Threads:
at most --max-connections x (--threads + 1). The Unix socket is created with mode 0600
(root only) whatever the umask; --socket-group and --socket-mode open it to a VM's user.

The server runs until SIGTERM or SIGINT (Ctrl-C); it then stops accepting, answers the
requests it has already read, flushes the export and exits 0 (a second signal exits at
once, without waiting for requests still in flight). The dirty map lives in memory:
it starts clean and is lost when the server stops."""

EPILOG = f"""\
examples:
  blocktrack serve disk.img --socket /run/disk.sock
  nbdinfo 'nbd+unix:///?socket=/run/disk.sock'
  qemu-io -f raw -c 'write -P 0xab 1M 64k' 'nbd+unix:///?socket=/run/disk.sock'
  nbdinfo --map={DIRTY_BITMAP} 'nbd+unix:///?socket=/run/disk.sock'

  blocktrack serve /dev/vg0/data --listen 0.0.0.0:10809 --export-name data --json
  qemu-img convert -p -O raw nbd://server:10809/data copy.img

  blocktrack serve /dev/vg0/vm1 --socket /run/vm1.sock --socket-group kvm   # mode 0660, group kvm
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve a device or image file over NBD and track writes",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", metavar="DEVICE_OR_FILE", help="the block device or image file to serve")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH",
                       help="listen on a Unix socket at PATH (a stale socket there is replaced; any other file is refused)")
    where.add_argument("--listen", metavar="[HOST]:PORT",
                       help="listen on TCP (HOST defaults to 127.0.0.1; NBD's usual port is 10809; "
                            "port 0 picks a free one, reported in the 'listening' event). No TLS: "
                            "use a trusted network or a Unix socket")
    parser.add_argument("--read-only", action="store_true",
                        help="refuse writes, trims and write-zeroes (NBD_EPERM); opens without O_EXCL")
    parser.add_argument("--export-name", default="", metavar="NAME",
                        help="the name clients ask for (default: the empty name; the empty name always "
                             "reaches this export)")
    parser.add_argument("--buffered", action="store_true",
                        help="do all I/O through the page cache instead of O_DIRECT")
    parser.add_argument("--socket-mode", metavar="MODE",
                        help="file mode of the --socket, in octal (default 0600: root only, whatever the "
                             "umask; 0660 with --socket-group)")
    parser.add_argument("--socket-group", metavar="GROUP",
                        help="group of the --socket (name or number), e.g. the group a VM runs as")
    parser.add_argument("--threads", type=int, default=4, metavar="N",
                        help="requests served in parallel per connection (default 4)")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help=f"clients served at once (default {DEFAULT_MAX_CONNECTIONS}); more wait in the "
                             "listen backlog until one leaves")
    parser.add_argument("--max-inflight", type=parse_size, default=DEFAULT_MAX_INFLIGHT, metavar="SIZE",
                        help=f"request data held in memory for all clients together (default "
                             f"{DEFAULT_MAX_INFLIGHT >> 20}M, at least 32M: the largest request); readers "
                             "wait when it is spent")
    parser.add_argument("--max-inflight-per-connection", type=parse_size, metavar="SIZE",
                        help=f"the same for one client (default {DEFAULT_MAX_INFLIGHT_PER_CONNECTION >> 20}M, "
                             "or --max-inflight if smaller; at least 32M)")
    parser.add_argument("--json", action="store_true",
                        help="events as JSON lines on stdout: serving (with the URI, the limits and the "
                             "socket's mode), listening, connected, transmission, disconnected (with request "
                             "and byte counts), stopped; and, at most every 10 s each: accept_failed, "
                             "connection_limit, inflight_limit, internal_error")
    parser.set_defaults(run=run)


class _Reporter:
    """Server events as JSON lines on stdout (--json), or short lines on stderr."""

    def __init__(self, json_lines: bool):
        self.json = json_lines
        self._lock = threading.Lock()

    def __call__(self, name: str, fields: dict) -> None:
        with self._lock:
            if self.json:
                sys.stdout.write(json.dumps({"event": name, **fields}, sort_keys=True) + "\n")
                sys.stdout.flush()
            elif name in ("accept_failed", "connection_limit", "inflight_limit", "internal_error"):
                sys.stderr.write(f"blocktrack serve: {name}: {fields}\n")
                sys.stderr.flush()


def _check_export_name(name: str) -> str:
    if "\0" in name or len(name.encode()) > 4096:
        raise UsageError("--export-name must be at most 4096 bytes and contain no NUL")
    return name


def _check_limits(args) -> int:
    """Validate the limits; return the per-connection in-flight budget."""
    if args.threads < 1 or args.threads > 64:
        raise UsageError(f"--threads must be between 1 and 64, got {args.threads}")
    if args.max_connections < 1:
        raise UsageError(f"--max-connections must be at least 1, got {args.max_connections}")
    largest = p.MAX_PAYLOAD
    if args.max_inflight < largest:
        raise UsageError(f"--max-inflight must be at least {largest >> 20}M (the largest NBD request), "
                         f"got {args.max_inflight} bytes")
    per_connection = args.max_inflight_per_connection
    if per_connection is None:
        return min(DEFAULT_MAX_INFLIGHT_PER_CONNECTION, args.max_inflight)
    if not largest <= per_connection <= args.max_inflight:
        raise UsageError(f"--max-inflight-per-connection must be between {largest >> 20}M (the largest NBD "
                         f"request) and --max-inflight ({args.max_inflight} bytes), got {per_connection} bytes")
    return per_connection


def run(args) -> int:
    per_connection = _check_limits(args)
    if not args.socket and (args.socket_mode is not None or args.socket_group is not None):
        raise UsageError("--socket-mode and --socket-group are for --socket")
    mode, gid = socket_mode("--socket", args.socket_mode, args.socket_group)
    name = _check_export_name(args.export_name)
    report = _Reporter(args.json)
    export = Export(args.path, name=name, read_only=args.read_only, direct=not args.buffered)
    if not args.read_only:
        # Clients may write it: a live migration recorded onto this path can no longer be resumed.
        invalidate_target_record(state_root(None), args.path, "`blocktrack serve` (writable)")
    server = None
    try:
        server = NbdServer(export, workers=args.threads, max_inflight_bytes=per_connection,
                           max_total_inflight_bytes=args.max_inflight, max_connections=args.max_connections,
                           on_event=report)
        settings = {"limits": server.limits}
        if args.socket:
            server.listen_unix(args.socket, mode=mode, gid=gid)
            where = f"unix socket {args.socket}"
            uri = f"nbd+unix:///{quote(name)}?socket={args.socket}"
            settings.update(socket_mode=f"{mode:04o}", socket_gid=gid)
        else:
            host, port = transport.parse_host_port(args.listen, default_host="127.0.0.1")
            host, port = server.listen_tcp(host, port)
            where = f"{host}:{port}"
            uri = f"nbd://{'[' + host + ']' if ':' in host else host}:{port}/{quote(name)}"
        report("serving", {"path": export.path, "size": export.size, "read_only": export.read_only,
                           "direct_io": export.direct, "export_name": name, "uri": uri,
                           "dirty_context": DIRTY_BITMAP, **settings})
        if not args.json:
            sys.stderr.write(f"blocktrack serve: {export.path} ({human_bytes(export.size)}"
                             f"{', read-only' if export.read_only else ''}"
                             f"{', O_DIRECT' if export.direct else ', buffered'}) on {where}; {uri}\n")
            sys.stderr.flush()

        def stop(signum, _frame):
            if server.stopping:
                # A second signal while requests are still finishing (a hung device): leave now.
                sys.stderr.write("blocktrack serve: second signal: exiting without waiting for "
                                 "requests in flight\n")
                sys.stderr.flush()
                os._exit(128 + signum)
            server.shutdown()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.serve_forever(wake_on_signals=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        dirty = export.dirty.count()
        total = server.total_connections
    finally:
        if server is not None:
            server.close()
        try:
            if not export.read_only:
                export.flush()
        finally:
            export.close()
    if not args.json:
        sys.stderr.write(f"blocktrack serve: stopped after {total} connection(s); "
                         f"{dirty} dirty chunk(s) of {export.dirty.nchunks}\n")
    return 0
