"""Receiver: turn a block-migration stream into writes on the targets named on the command line.

The receiver is a wall (ARCHITECTURE.md, invariant 4). Everything it writes has passed these checks
first, in this order, so a bad stream stops *before* the write it would have caused:

1. the record is well formed (blocktrack.wire validates framing, flags, names, envelope);
2. its device name is one the operator mapped with ``--device NAME=PATH``;
3. its sector lies on a chunk boundary and inside the target (QEMU's loader checks neither);
4. for data records, the whole payload has arrived (read into an aligned buffer before any write),
   and any bytes that fall past the target's end are zero: a non-zero byte there means the source is
   larger than the target, and writing the rest would silently drop data.

Each target is locked (lock_target, an exclusive flock) for the whole stream: a second concurrent
stream to the same target is refused before it writes anything. Then, still before anything is
written, a plain stream drops any live migration's record of the target (savedstate.
invalidate_target_record): the target is about to hold other data, so that migration can no
longer be resumed onto it as if it held what the record says.

Writes go through ChunkWriter (O_DIRECT, several in flight). Success — exit 0 — only after the stream
reached its proper end and every write was flushed and synced.

Checks 3 and 4 and the write itself are ``apply_block``, which the live-migration receiver
(live_receiver.py) uses for every record too.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import ExitStack

from blocktrack.directio import CHUNK_SIZE, ChunkWriter, is_zero
from blocktrack.dirtymap import DirtyMap
from blocktrack.errors import BlocktrackError, DeviceError, StreamError, UsageError
from blocktrack.migrate.savedstate import invalidate_target_record
from blocktrack.migrate.verify import chunk_digest
from blocktrack.migrate.sender import DeviceSpec, TransferSummary, unique_names
from blocktrack.wire import SECTOR_SIZE, StreamReader


class _Target:
    def __init__(self, spec: DeviceSpec, depth: int, chunk_size: int):
        self.spec = spec
        self.writer = ChunkWriter(spec.path, chunk_size=chunk_size, depth=depth)
        self.size = self.writer.size
        self.written = DirtyMap.for_size(self.size, chunk_size)
        self.chunks = 0
        self.zero_chunks = 0


def receive_stream(source, specs: list[DeviceSpec], *, progress=None, depth: int = 8,
                   expect_full: bool = False, chunk_size: int = CHUNK_SIZE,
                   tail_padding: bool = False, state_root=None) -> TransferSummary:
    """Apply the stream read from ``source`` to the mapped targets; return what was written.

    With ``expect_full`` the stream must also have written every chunk of every target (a full copy),
    which catches a sender that stopped early (QEMU 7.2's block migration can). ``chunk_size`` is the
    wire format's 1 MiB except in the fuzzer, which uses small chunks to run fast. ``tail_padding``:
    bytes of a chunk past the target's end are padding, not data (see apply_block).
    ``state_root``: the migrations folder whose records of these targets the stream invalidates.
    """
    unique_names(specs)
    if not specs:
        raise UsageError("name at least one target with --device NAME=PATH")
    summary = TransferSummary()
    started = time.monotonic()
    with ExitStack() as cleanup:
        targets: dict[str, _Target] = {}
        for spec in specs:
            cleanup.callback(os.close, lock_target(spec.path))
            if state_root is not None:
                invalidate_target_record(state_root, spec.path, "a plain `blocktrack receive` stream")
            target = _Target(spec, depth, chunk_size)
            cleanup.callback(_close_quietly, target.writer)
            targets[spec.name] = target
        reader = StreamReader(source, chunk_size=chunk_size)
        total_bytes = sum(target.size for target in targets.values())
        done_bytes = 0
        while True:
            record = reader.next_record()
            if record is None:
                break
            if record.kind != "block":
                continue
            target = targets.get(record.device)
            if target is None:
                raise StreamError(
                    f"device {record.device!r} is not mapped on the command line "
                    f"(mapped: {', '.join(sorted(targets))})", record.offset, record.device)
            offset, length = apply_block(reader, record, target, chunk_size, tail_padding=tail_padding)
            target.chunks += 1
            target.written.mark(offset // chunk_size)
            done_bytes += length
            if progress is not None:
                progress.update(done_bytes, total_bytes if expect_full else None, device=record.device)
        # The stream is complete: only now may the targets be called written. flush() waits for
        # every write and syncs, raising the first failure.
        for target in targets.values():
            target.writer.flush()
        summary.stream_bytes = reader.offset
        summary.device_bytes = done_bytes
    for target in targets.values():
        covered = target.written.count()
        summary.chunks += target.chunks
        summary.zero_chunks += target.zero_chunks
        summary.devices.append({"name": target.spec.name, "path": target.spec.path, "size": target.size,
                                "chunks": target.chunks, "zero_chunks": target.zero_chunks,
                                "chunks_covered": covered, "target_chunks": target.written.nchunks,
                                "direct_io": target.writer.direct})
        if expect_full and covered != target.written.nchunks:
            missing = target.written.nchunks - covered
            raise StreamError(f"the stream ended without {missing} of {target.written.nchunks} chunks of "
                              f"{target.spec.name!r}: the target is incomplete", device=target.spec.name)
    summary.seconds = time.monotonic() - started
    return summary


def apply_block(reader: StreamReader, record, target: _Target, chunk_size: int,
                limit: int | None = None, tail_padding: bool = False, digests=None) -> tuple[int, int]:
    """Check one block record against its target and write it (checks 3 and 4 of the docstring).

    ``limit`` is the end of the writable range (the target's size unless a migration handshake
    announced a smaller device). Returns the (offset, length) written.

    The chunk that crosses the end of the target: by default its bytes past the end must be zero,
    since a plain stream does not say how large its source is, and non-zero bytes there may be the
    data of a source larger than the target (refused, never cut silently). QEMU 7.2's sender fills
    them with whatever its buffer held (seen in the tests: zeros usually, garbage sometimes) and its
    own loader ignores them; ``tail_padding`` (receive --tail-padding) does as QEMU's loader does.
    A migration stream announces its device's size, so this question never arises there.

    ``digests`` (a verify.DigestMap, live migrations): gets the digest of the bytes written, hashed
    from the buffer just received, while it is in cache (a zero chunk: the digest of zeros).
    """
    limit = target.size if limit is None else min(limit, target.size)
    if record.sector % (chunk_size // SECTOR_SIZE):
        raise StreamError(f"sector {record.sector} is not on a {chunk_size}-byte chunk boundary",
                          record.offset, record.device)
    offset = record.sector * SECTOR_SIZE
    if offset >= limit:
        raise StreamError(f"sector {record.sector} is beyond the end of target {target.spec.path} "
                          f"({limit} bytes)", record.offset, record.device)
    length = min(chunk_size, limit - offset)
    if record.zero:
        target.writer.write_zeroes(offset, length)  # after any earlier write of the chunk: see ChunkWriter
        if digests is not None:
            digests.set_zero(offset // chunk_size)
        target.zero_chunks += 1
    else:
        token, buf = target.writer.buffer()
        reader.read_payload(buf)
        if length < chunk_size and not tail_padding and not is_zero(buf[length:]):
            raise StreamError(
                f"chunk at sector {record.sector} carries data past the end of target "
                f"{target.spec.path} ({limit} bytes): the source is larger than the target",
                record.offset, record.device)
        if digests is not None:  # hashed now, while the bytes just received are in this core's cache
            digests.set(offset // chunk_size, chunk_digest(buf[:length]))
        target.writer.submit(token, offset, length)
    return offset, length


def lock_target(path: str) -> int:
    """Take the target's exclusive lock for one stream; return the fd that holds it (close to drop).

    An flock on the target itself (the device node, or the image file): every path to the same
    node (/dev/VG/LV and /dev/dm-N are symlinks to one node) meets the same lock, it needs no
    lock folder, and the kernel drops it when the receiver dies, so a crash never leaves a stale
    lock behind. It keeps out a second `blocktrack receive` only, not other programs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot open target {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DeviceError(f"target {path} is busy: another blocktrack receive is writing it (a second "
                          "concurrent stream to one target is refused)") from None
    return fd


def _close_quietly(writer) -> None:
    """Close a writer on the way out. After a successful flush() there is nothing left to fail; on an
    error path the error already being raised is the one the operator needs to see."""
    try:
        writer.close()
    except BlocktrackError:
        pass
