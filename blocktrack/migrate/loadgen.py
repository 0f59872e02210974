"""A writer for demos, benchmarks and tests: random writes through NBD at a steady dirtying rate.

    python -m blocktrack.migrate.loadgen --socket PATH --rate BYTES_PER_S [--seed N] [--max-write BYTES]

Connects to an NBD server on a Unix socket (waiting for it to appear), then writes random data at
random 4 KiB-aligned offsets, each write 4 KiB to --max-write long. The rate counts *dirtied chunk
bytes* — every 1 MiB chunk a write touches counts as 1 MiB — because that, not the bytes written,
is what a migration has to send again; "a writer at 20 % of the link" means it dirties chunks at a
fifth of the link rate. --rate 0 connects and writes nothing.

When the server goes away (a killed migration) it reconnects, and retries the write that failed,
until stopped. A write the server answers with an error (a retired source) ends it, exit status 3.
Events go to stdout as JSON lines: "connected", "write_failed" (connection lost, with the error),
"write_refused", and at the end "stopped" with counts. Writes are synchronous: one in flight.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time

from blocktrack.nbd.client import NbdClient, NbdError
from blocktrack.nbd.sockio import PeerClosed

CHUNK = 1 << 20
ALIGN = 4096


class _Stop(Exception):
    pass


def _emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}, sort_keys=True) + "\n")
    sys.stdout.flush()


def _connect(path: str, deadline: float) -> NbdClient:
    while True:
        try:
            client = NbdClient.unix(path, timeout=None)
            client.handshake()
            return client
        except (OSError, PeerClosed, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blocktrack.migrate.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--rate", type=float, required=True, help="dirtied chunk bytes per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-write", type=int, default=256 << 10)
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    def stop(_signum, _frame):
        raise _Stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    rng = random.Random(args.seed)
    counts = {"writes": 0, "bytes": 0, "dirtied_bytes": 0, "failures": 0, "connections": 0}
    client = None
    try:
        client = _connect(args.socket, time.monotonic() + args.connect_timeout)
        counts["connections"] += 1
        _emit("connected", size=client.size, connection=counts["connections"])
        size = client.size
        if args.rate <= 0:
            while True:
                time.sleep(3600)
        allowance, last = 0.0, time.monotonic()
        pending = None
        while True:
            if pending is None:
                length = rng.randrange(1, max(2, args.max_write // ALIGN + 1)) * ALIGN
                length = min(length, size)
                offset = rng.randrange(0, (size - length) // ALIGN + 1) * ALIGN
                pending = (offset, rng.randbytes(length))
            offset, data = pending
            touched = (offset + len(data) - 1) // CHUNK - offset // CHUNK + 1
            now = time.monotonic()
            allowance = min(args.rate * 0.25, allowance + (now - last) * args.rate)
            last = now
            if allowance < 0:
                time.sleep(-allowance / args.rate)
                continue
            try:
                client.write(offset, data)
            except NbdError as exc:
                # The server answered: the write was refused (a retired source), not lost in transit.
                counts["failures"] += 1
                _emit("write_refused", offset=offset, length=len(data), error=str(exc))
                return 3
            except (OSError, PeerClosed, ValueError) as exc:
                counts["failures"] += 1
                _emit("write_failed", offset=offset, length=len(data), error=str(exc))
                try:
                    client.close()
                except OSError:
                    pass
                client = _connect(args.socket, time.monotonic() + args.connect_timeout)
                counts["connections"] += 1
                _emit("connected", size=client.size, connection=counts["connections"])
                continue
            allowance -= touched * CHUNK
            counts["writes"] += 1
            counts["bytes"] += len(data)
            counts["dirtied_bytes"] += touched * CHUNK
            pending = None
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _emit("stopped", **counts)
        if client is not None:
            try:
                client.close()
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
