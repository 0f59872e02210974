"""Mutation fuzzer for the receiver: valid streams, randomly damaged, fed to receive_stream().

Each case must end either in success or in a BlocktrackError, never in another exception, and must
never change anything but the named targets (no new files, no size change, the canary untouched).

It runs in-process with a 4 KiB chunk size so that a case costs about a millisecond; the receiver's
checks do not depend on the chunk size. ``make fuzz`` runs 100,000 cases; the test suite runs a few
thousand. Usage: python -m tests.host.fuzz_receiver [--cases N] [--seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

from blocktrack.errors import BlocktrackError
from blocktrack.migrate.receiver import receive_stream
from blocktrack.migrate.sender import DeviceSpec
from blocktrack.wire import StreamWriter

CHUNK = 4096
SECTORS = CHUNK // 512
TARGETS = {"a": 3 * CHUNK + 512, "bb": 2 * CHUNK}


class _BytesSink:
    def __init__(self):
        self.buf = io.BytesIO()

    def write(self, data) -> None:
        self.buf.write(data)


def seed_streams(rng: random.Random) -> list[bytes]:
    """Valid streams in both envelopes: several devices, zero blocks, progress, several parts."""
    streams = []
    for envelope in ("qemu", "none"):
        for variant in range(4):
            sink = _BytesSink()
            writer = StreamWriter(sink, envelope=envelope, chunk_size=CHUNK)
            writer.start()
            for part in range(1 + variant % 2):
                for name, size in TARGETS.items():
                    for chunk in range(-(-size // CHUNK)):
                        if variant >= 2 and rng.random() < 0.3:
                            writer.block(name, chunk * SECTORS, zero=True)
                        else:
                            data = bytearray(rng.randbytes(CHUNK))
                            valid = min(CHUNK, size - chunk * CHUNK)
                            data[valid:] = bytes(CHUNK - valid)
                            writer.block(name, chunk * SECTORS, bytes(data))
                    writer.progress(50 * (part + 1))
                writer.end_part()
            writer.finish()
            streams.append(sink.buf.getvalue())
    return streams


def mutate(stream: bytes, rng: random.Random) -> bytes:
    data = bytearray(stream)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        how = rng.randrange(8)
        pos = rng.randrange(len(data) + 1) if data else 0
        if how == 0 and data:                                   # flip a bit
            pos = min(pos, len(data) - 1)
            data[pos] ^= 1 << rng.randrange(8)
        elif how == 1 and data:                                 # set a byte to an interesting value
            pos = min(pos, len(data) - 1)
            data[pos] = rng.choice((0, 1, 2, 4, 8, 0x10, 0x7E, 0x7F, 0x80, 0xFF))
        elif how == 2:                                          # truncate
            del data[pos:]
        elif how == 3:                                          # delete a span
            del data[pos:pos + rng.randrange(1, 64)]
        elif how == 4:                                          # insert random bytes
            data[pos:pos] = rng.randbytes(rng.randrange(1, 16))
        elif how == 5 and data:                                 # duplicate a span
            end = min(len(data), pos + rng.randrange(1, 9000))
            data[pos:pos] = data[pos:end]
        elif how == 6:                                          # a forged record header
            sector = rng.choice((0, 1, SECTORS, 3 * SECTORS, 4 * SECTORS, 1 << 40, (1 << 55) - 1))
            flags = rng.choice((1, 2, 4, 8, 9, 0x10, 0x1FF, 5))
            name = rng.choice((b"a", b"bb", b"", b"zz", b"a" * 255))
            data[pos:pos] = struct.pack(">Q", (sector << 9) | flags) + bytes([len(name) & 0xFF]) + name
        else:                                                   # overwrite 8 bytes with a be64
            pos = min(pos, max(len(data) - 8, 0))
            data[pos:pos + 8] = struct.pack(">Q", rng.getrandbits(64))
    return bytes(data)


def _fingerprint(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest() if p.name == "canary" else None)
            for p in folder.iterdir()}


def run(cases: int, seed: int, folder: Path, report_every: int = 0) -> dict:
    rng = random.Random(seed)
    streams = seed_streams(rng)
    for name, size in TARGETS.items():
        (folder / name).write_bytes(bytes(size))
    (folder / "canary").write_bytes(rng.randbytes(3 * CHUNK))
    specs = [DeviceSpec(name, str(folder / name)) for name in TARGETS]
    before = _fingerprint(folder)
    outcomes = {"ok": 0, "refused": 0}
    started = time.monotonic()
    for case in range(cases):
        stream = mutate(rng.choice(streams), rng)
        try:
            receive_stream(io.BytesIO(stream), specs, chunk_size=CHUNK, depth=2)
            outcomes["ok"] += 1
        except BlocktrackError:
            outcomes["refused"] += 1
        except Exception as exc:  # a traceback is a bug: keep the input for a reproducer
            crash = folder.parent / f"crash-{seed}-{case}.stream"
            crash.write_bytes(stream)
            raise AssertionError(f"case {case}: {type(exc).__name__}: {exc} (input kept in {crash})") from exc
        after = _fingerprint(folder)
        if after != before:
            raise AssertionError(f"case {case}: something outside the targets changed: {before} -> {after}")
        if report_every and (case + 1) % report_every == 0:
            print(f"{case + 1} cases, {outcomes}, {time.monotonic() - started:.0f} s", flush=True)
    outcomes["seconds"] = round(time.monotonic() - started, 1)
    return outcomes


def run_appended(cases: int, seed: int, folder: Path) -> dict:
    """Valid streams with something after their end (another stream, a slice of one, a forged record,
    random bytes): each must be refused, and the targets must hold exactly what the stream before
    the append wrote. A bare stream ends at its final part, a QEMU stream after its JSON description;
    nothing after that end may reach a target."""
    rng = random.Random(seed)
    streams = seed_streams(rng)
    for name, size in TARGETS.items():
        (folder / name).write_bytes(bytes(size))
    specs = [DeviceSpec(name, str(folder / name)) for name in TARGETS]

    def targets() -> dict:
        return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in TARGETS}

    outcomes = {"refused": 0}
    for case in range(cases):
        stream = rng.choice(streams)
        other = rng.choice(streams)
        how = rng.randrange(5)
        if how == 0:
            extra = other                                       # another whole stream (cat a b)
        elif how == 1:
            start = rng.randrange(len(other))
            extra = other[start:start + rng.randrange(1, 3 * CHUNK)]
        elif how == 2:                                          # a forged block record, with its data
            extra = struct.pack(">Q", (rng.choice((0, SECTORS)) << 9) | 1) + b"\x01a" + rng.randbytes(CHUNK)
        elif how == 3:
            extra = mutate(other, rng)
        else:
            extra = rng.randbytes(rng.randrange(1, 64))
        receive_stream(io.BytesIO(stream), specs, chunk_size=CHUNK, depth=2)
        expected = targets()
        try:
            receive_stream(io.BytesIO(stream + extra), specs, chunk_size=CHUNK, depth=2)
        except BlocktrackError:
            outcomes["refused"] += 1
        else:
            raise AssertionError(f"case {case}: a stream with {len(extra)} bytes after its end (kind {how}) "
                                 "was accepted")
        if targets() != expected:
            raise AssertionError(f"case {case}: bytes after the end of a stream (kind {how}) reached a target")
    return outcomes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    args = parser.parse_args(argv)
    print(f"fuzzing the receiver: {args.cases} cases, seed {args.seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bt-fuzz-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        folder = Path(tmp) / "targets"
        folder.mkdir()
        outcomes = run(args.cases, args.seed, folder, report_every=10_000)
    print(f"done: {outcomes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
