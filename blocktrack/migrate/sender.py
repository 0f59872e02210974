"""Sender: read whole devices with O_DIRECT and write them as a QEMU block-migration stream.

This is the bulk pass of a migration on its own: a full copy of quiescent devices, one device after
the other, chunk by chunk in ascending order, as QEMU's bulk phase sends them (migration/block.c,
``blk_mig_save_bulked_block``). Reads run ahead in the C core (ChunkReader keeps ``depth`` reads in
flight) while this thread writes the previous chunk to the sink, so disk and link overlap.

Progress records: like QEMU, one PROGRESS record whenever the whole-transfer percentage changes, and
an EOS record closing each part of ``PART_CHUNKS`` chunks (QEMU closes a part when its rate limit for
the iteration is reached; any split is valid for its loader).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from blocktrack.directio import CHUNK_SIZE, ChunkReader, is_zero
from blocktrack.errors import UsageError
from blocktrack.wire import SECTOR_SIZE, StreamWriter

PART_CHUNKS = 256


@dataclass(frozen=True)
class DeviceSpec:
    """A ``NAME=PATH`` pair from the command line: the wire name and the local device or file."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> "DeviceSpec":
        """``NAME=PATH``. A device name may itself hold '=' (any UTF-8 goes on the wire), so with more
        than one '=' the split is at the one that leaves an existing PATH, and a text that reads more
        than one way (or none) is refused rather than guessed: a wrong guess could map a name to the
        wrong target. ``named()`` (``--device-name NAME --device PATH``) needs no split at all."""
        readings = [(text[:i], text[i + 1:]) for i, c in enumerate(text) if c == "=" and 0 < i < len(text) - 1]
        if not readings:
            raise UsageError(f"--device wants NAME=PATH, got {text!r}")
        if len(readings) > 1:
            existing = [(name, path) for name, path in readings if os.path.exists(path)]
            if len(existing) != 1:
                what = "reads more than one way" if existing else "names no existing PATH however it is split"
                listing = "; ".join(f"{name!r} → {path}" for name, path in existing or readings)
                raise UsageError(f"--device {text!r} {what} ({listing}): say which with --device-name NAME "
                                 "--device PATH")
            readings = existing
        return cls.named(*readings[0])

    @classmethod
    def named(cls, name: str, path: str) -> "DeviceSpec":
        if not name or not path:
            raise UsageError(f"a device needs a name and a path, got {name!r} and {path!r}")
        if len(name.encode()) > 255:
            raise UsageError(f"device name {name!r} is longer than 255 bytes (the wire format's limit)")
        return cls(name, path)


def unique_names(specs: list[DeviceSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise UsageError(f"device name {spec.name!r} is given twice")
        seen.add(spec.name)


@dataclass
class TransferSummary:
    devices: list[dict] = field(default_factory=list)
    device_bytes: int = 0
    stream_bytes: int = 0
    chunks: int = 0
    zero_chunks: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "devices": self.devices,
            "device_bytes": self.device_bytes,
            "stream_bytes": self.stream_bytes,
            "chunks": self.chunks,
            "zero_chunks": self.zero_chunks,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.device_bytes / self.seconds / 1e6, 1) if self.seconds > 0 else None,
        }


def send_devices(specs: list[DeviceSpec], sink, *, envelope: str = "qemu", zero_blocks: bool = False,
                 progress=None, depth: int = 8) -> TransferSummary:
    """Stream every device in ``specs`` to ``sink``; return what was sent."""
    unique_names(specs)
    summary = TransferSummary()
    started = time.monotonic()
    readers = []
    try:
        for spec in specs:
            readers.append(ChunkReader(spec.path, chunk_size=CHUNK_SIZE, depth=depth))
        total_bytes = sum(reader.size for reader in readers)
        writer = StreamWriter(sink, envelope=envelope, chunk_size=CHUNK_SIZE)
        writer.start()
        tail_buffer = bytearray(CHUNK_SIZE)
        last_percent = -1
        done_bytes = 0
        chunks_in_part = 0
        for spec, reader in zip(specs, readers):
            device_zero = 0
            for index, data in reader.read(range(reader.nchunks)):
                sector = index * (CHUNK_SIZE // SECTOR_SIZE)
                if zero_blocks and is_zero(data):
                    writer.block(spec.name, sector, zero=True)
                    device_zero += 1
                elif len(data) == CHUNK_SIZE:
                    writer.block(spec.name, sector, data)
                else:
                    # The device's tail: the wire always carries a whole chunk; pad with zeros (QEMU
                    # sends an uninitialised buffer here) and the receiver writes only the real part.
                    tail_buffer[: len(data)] = data
                    tail_buffer[len(data):] = bytes(CHUNK_SIZE - len(data))
                    writer.block(spec.name, sector, tail_buffer)
                done_bytes += len(data)
                summary.chunks += 1
                percent = done_bytes * 100 // total_bytes if total_bytes else 100
                if percent != last_percent:
                    writer.progress(percent)
                    last_percent = percent
                chunks_in_part += 1
                if chunks_in_part == PART_CHUNKS:
                    writer.end_part()
                    chunks_in_part = 0
                if progress is not None:
                    progress.update(done_bytes, total_bytes, device=spec.name)
            summary.zero_chunks += device_zero
            summary.devices.append({"name": spec.name, "path": spec.path, "size": reader.size,
                                    "chunks": reader.nchunks, "zero_chunks": device_zero,
                                    "direct_io": reader.direct})
        writer.finish()
        summary.device_bytes = done_bytes
        summary.stream_bytes = writer.bytes_written
    finally:
        for reader in readers:
            reader.close()
    summary.seconds = time.monotonic() - started
    if progress is not None:
        progress.update(summary.device_bytes, summary.device_bytes, force=True)
    return summary
