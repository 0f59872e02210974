#!/usr/bin/env python3
"""A writer for the backend tests: O_DIRECT writes + fdatasync at random places in preallocated files,
each logged with its start and end time (CLOCK_MONOTONIC, comparable across processes), until a stop
file appears. At the end it reads every written block back and checks its contents; any I/O error or
mismatch makes it exit non-zero.

    writer.py --log LOG --stop STOPFILE [--seed N] FILE...

Log lines: ``<start> <end> <file index> <offset> <length>`` (times in seconds, offsets in bytes).
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import sys
import time
import zlib

BLOCK = 4096


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--log", required=True)
    p.add_argument("--stop", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-blocks", type=int, default=32, help="largest write, in 4 KiB blocks")
    p.add_argument("files", nargs="+")
    args = p.parse_args()
    rng = random.Random(args.seed)
    fds = [os.open(f, os.O_RDWR | os.O_DIRECT) for f in args.files]
    sizes = [os.fstat(fd).st_size for fd in fds]
    buf = mmap.mmap(-1, args.max_blocks * BLOCK)
    expect: dict[tuple[int, int], int] = {}
    log = open(args.log, "w", buffering=1)
    seq = 0
    try:
        while not os.path.exists(args.stop):
            i = rng.randrange(len(fds))
            nblocks = rng.randint(1, args.max_blocks)
            block = rng.randrange(sizes[i] // BLOCK - nblocks + 1)
            length = nblocks * BLOCK
            seq += 1
            for b in range(nblocks):          # every block unique: sequence number + position
                stamp = f"{seq}:{i}:{block + b}:".encode()
                buf[b * BLOCK:(b + 1) * BLOCK] = (stamp * (BLOCK // len(stamp) + 1))[:BLOCK]
            start = time.monotonic()
            done = os.pwritev(fds[i], [memoryview(buf)[:length]], block * BLOCK)
            if done != length:
                raise OSError(f"short write {done} of {length}")
            os.fdatasync(fds[i])
            end = time.monotonic()
            log.write(f"{start:.6f} {end:.6f} {i} {block * BLOCK} {length}\n")
            for b in range(nblocks):
                expect[(i, block + b)] = zlib.crc32(buf[b * BLOCK:(b + 1) * BLOCK])
            time.sleep(rng.random() * 0.02)
        # Read back: what was written last is there.
        bad = 0
        for (i, block), crc in sorted(expect.items()):
            n = os.preadv(fds[i], [memoryview(buf)[:BLOCK]], block * BLOCK)
            if n != BLOCK or zlib.crc32(buf[:BLOCK]) != crc:
                bad += 1
        if bad:
            print(f"writer: {bad} blocks read back wrong", file=sys.stderr)
            return 3
        print(f"writer: {seq} writes, {len(expect)} blocks verified")
        return 0
    except OSError as exc:
        print(f"writer: I/O error: {exc}", file=sys.stderr)
        return 2
    finally:
        log.close()
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
