"""The receiving end of a live migration: handshake, the stream in frames, acknowledgements, digests.

``blocktrack receive --listen`` hands a connection here when its first 8 bytes are the migration
handshake (wire/control.py); a plain QEMU or bare stream still goes to receiver.receive_stream.
The wall (receiver.py, invariant 4) stands as before — every block record passes the same checks in
``apply_block`` before anything is written — and the handshake adds its own, all before any data:

1. the protocol version and flags are ones we speak (else REFUSE "version");
2. the device name is mapped with ``--device NAME=PATH`` (else REFUSE "device");
3. the target is at least as large as the device (else REFUSE "size"): a smaller target would lose
   the device's tail, so nothing is written at all;
4. a resume (flag RESUME) names the migration id this target already belongs to (else REFUSE
   "migration id"): a target half-written by migration A is never continued by migration B; nor
   is a target that a plain ``blocktrack receive`` wrote since (receiver.py marks the record
   "overwritten": what the target held is unknown, the migration must start over);
5. no other stream is writing the target (an exclusive flock on it, receiver.lock_target; else
   REFUSE "target").

All of it after the transport authenticated the sender (secure.py): TLS, a pre-shared key, or ssh.

Then, only inside the device's size: records are written as they arrive (O_DIRECT, several in
flight). ACKs go back as the stream is parsed (``received``) and, after a flush and sync, as it is
durable (``durable``, every DURABLE_EVERY bytes written to the target and at each end of part) — the sender saves its
resume point from those. The chunks of this migration that are on stable storage are kept in
``held.map`` (savedstate.py), so a receiver restarted after a dropped connection can accept the
resume and tell the sender what it already has.

The digest map (verify.DigestMap): the digest of each chunk as it is written, hashed from the
buffer it was just received into, before it is submitted (zero chunks: the digest of zeros). On a resume
``held.map`` only says which chunks need not be sent again; their digests are read back from the
target before ACCEPT (keep-alives go out meanwhile), so anything that wrote the target between two
connections shows in the comparison at the cutover, whatever the saved files say.

At the END frame: flush and sync; the target must hold every chunk of the device (the sender's
early finish, QEMU 7.2's bug, is caught here too); the whole digest map (or for VERIFY_FULL the
digests of every chunk read back from the target) goes back as RESULT. The sender compares it
with its own and sends a VERDICT: exit 0 only for "verified".

A connection that ends early leaves the target with whole records only, flushed; the held map says
which chunks are there, and the error says to resume.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from blocktrack.dirtymap import DirtyMap
from blocktrack.errors import (BlocktrackError, DeviceError, PeerError, PeerStalled, StreamError, StreamTruncated,
                               UsageError)
from blocktrack.kernel.blockdev import device_size
from blocktrack.migrate.failures import VerifyError
from blocktrack.migrate.receiver import _Target, apply_block, lock_target
from blocktrack.migrate.savedstate import TargetState, make_folder, target_folder
from blocktrack.migrate.sender import DeviceSpec
from blocktrack.migrate.verify import DigestMap, digest_chunks
from blocktrack.transport import Heartbeat
from blocktrack.wire import CHUNK_SIZE, StreamReader
from blocktrack.wire import control as C

DURABLE_EVERY = 8 << 20
_RESUME_HINT = "the target holds whole chunks only; run `blocktrack migrate ... --resume` against a receiver " \
               "with the same --device to continue"


class _Connection:
    """Exact reads and whole-message writes on the channel, counting connection bytes (for error offsets)."""

    def __init__(self, channel, consumed: int):
        self.channel = channel
        self.offset = consumed

    def recv_into(self, view) -> int:
        try:
            got = self.channel.recv_into(view)
        except PeerStalled as exc:
            raise PeerStalled(f"the sender stalled: {exc}") from None
        self.offset += got
        return got

    def recv_exact(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.recv_into(view[got:])
            if k == 0:
                raise StreamTruncated(f"the connection ended {what} ({got} of {n} bytes)", self.offset)
            got += k
        return bytes(buf)

    def send(self, data: bytes) -> None:
        try:
            self.channel.sendall(data)
        except PeerStalled:
            raise
        except PeerError as exc:
            raise PeerError(f"the sender went away (connection lost while answering it: {exc})") from None


class FramedSource:
    """The migration stream inside DATA frames, for StreamReader: readinto() returns 0 at END."""

    def __init__(self, conn: _Connection):
        self.conn = conn
        self.remaining = 0
        self.received = 0       # stream bytes that arrived in DATA frames: checked against MARK
        self.ended = False
        self.eof = False

    def readinto(self, buf) -> int:
        if self.ended or self.eof:
            return 0
        while self.remaining == 0:
            start = self.conn.offset
            try:
                head = self.conn.recv_exact(C.FRAME.size, "between two frames")
            except StreamTruncated:
                self.eof = True  # the reader reports where the stream stopped
                return 0
            kind, length = C.decode_frame_header(head, start)
            if kind == C.FRAME_KEEPALIVE:
                continue
            if kind == C.FRAME_MARK:
                (sent,) = C.MARK.unpack(self.conn.recv_exact(C.MARK.size, "inside a mark frame"))
                if sent != self.received:
                    raise StreamError(f"the stream was altered on the way: the sender had sent {sent} bytes of "
                                      f"it, {self.received} arrived (a middlebox cut or spliced it; use TLS or "
                                      "a pre-shared key, which protect it)", start)
                continue
            if kind == C.FRAME_END:
                self.ended = True
                return 0
            if kind != C.FRAME_DATA:
                raise StreamError("verdict frame before the end of the migration stream", start)
            self.remaining = length
        view = memoryview(buf).cast("B")[:self.remaining]
        got = self.conn.recv_into(view)
        if got == 0:
            self.eof = True
            return 0
        self.remaining -= got
        self.received += got
        return got

    def read_verdict(self) -> tuple[int, str]:
        while True:
            start = self.conn.offset
            head = self.conn.recv_exact(C.FRAME.size, "before the sender's verdict")
            kind, length = C.decode_frame_header(head, start)
            if kind != C.FRAME_KEEPALIVE:
                break
        if kind != C.FRAME_VERDICT:
            raise StreamError(f"expected the sender's verdict, got frame type {kind}", start)
        return C.decode_verdict(self.conn.recv_exact(length, "inside the sender's verdict"))


def serve_migration(channel, head: bytes, specs: list[DeviceSpec], *, state_root: Path,
                    progress=None, depth: int = 8) -> dict:
    """Run one migration connection whose first bytes ``head`` (the 8-byte magic) were read.

    ``channel`` is a connected, authenticated transport.Channel (TCP, TLS, or stdin/stdout under
    ssh); its stall timeout bounds every wait, and a Heartbeat answers KEEPALIVE while this end is
    busy (flushing, digesting) so the sender can tell busy from stalled."""
    conn = _Connection(channel, len(head))
    hello, name_len = C.decode_hello_head(head + conn.recv_exact(C.HELLO.size - len(head), "inside the handshake"))
    hello = C.decode_hello_name(hello, conn.recv_exact(name_len, "inside the handshake's device name"))

    def refuse(reason: int, message: str, error: type[BlocktrackError] = UsageError):
        """Answer REFUSE (nothing has been written), then fail with ``error``'s exit code."""
        try:
            conn.send(C.encode_refuse(reason, message))
        except PeerError:
            pass
        text = f"refused migration {hello.migration_id.hex()} of {hello.device!r}: {message}"
        raise error(text)

    if hello.version != C.VERSION or hello.flags & ~C.KNOWN_HELLO_FLAGS:
        refuse(C.REFUSE_VERSION, f"protocol version {hello.version} with flags {hello.flags:#x}; this receiver "
                                 f"speaks version {C.VERSION}", StreamError)
    if hello.chunk_size != CHUNK_SIZE:
        refuse(C.REFUSE_VERSION, f"chunk size {hello.chunk_size}; this receiver uses {CHUNK_SIZE}", StreamError)
    spec = next((s for s in specs if s.name == hello.device), None)
    if spec is None:
        refuse(C.REFUSE_DEVICE, f"device {hello.device!r} is not mapped on the receiver's command line "
                                f"(mapped: {', '.join(sorted(s.name for s in specs))})")
    try:
        target_size = device_size(spec.path)
    except BlocktrackError as exc:
        refuse(C.REFUSE_TARGET, str(exc), UsageError if isinstance(exc, UsageError) else DeviceError)
    if target_size < hello.size:
        refuse(C.REFUSE_SIZE, f"target {spec.path} has {target_size} bytes, smaller than the {hello.size}-byte "
                              f"device {hello.device!r}: nothing was written", DeviceError)

    # One stream per target at a time: a second sender (or a second receiver on the same target)
    # would interleave writes with the first and both would "verify" their own chunks.
    try:
        target_lock = lock_target(spec.path)
    except DeviceError as exc:
        refuse(C.REFUSE_TARGET, str(exc), DeviceError)
    try:
        return _serve_locked(conn, hello, spec, target_size, refuse, state_root, progress, depth)
    finally:
        os.close(target_lock)


def _serve_locked(conn, hello, spec, target_size, refuse, state_root, progress, depth) -> dict:
    mid = hello.migration_id.hex()
    try:
        folder = make_folder(target_folder(state_root, spec.path))
        saved = TargetState.load(folder)
    except UsageError as exc:     # a state folder someone else could change (safepath.py), a damaged record
        refuse(C.REFUSE_TARGET, f"the receiver's state folder: {exc}")
    held = DirtyMap(hello.nchunks, hello.chunk_size)
    if hello.resume:
        if saved is None or saved.migration_id != mid or saved.device != hello.device or saved.size != hello.size:
            what = "no migration" if saved is None else f"migration {saved.migration_id} of {saved.device!r}"
            refuse(C.REFUSE_MIGRATION, f"cannot resume migration {mid}: target {spec.path} belongs to {what}")
        if saved.status == "verified":
            refuse(C.REFUSE_MIGRATION, f"migration {mid} already completed and was verified on {spec.path}")
        if saved.status == "overwritten":
            refuse(C.REFUSE_MIGRATION, f"cannot resume migration {mid}: target {spec.path} was written outside it "
                                       f"since ({saved.overwritten or 'by another stream'}), so what it holds of the "
                                       "migration is unknown; start the migration over with `blocktrack migrate "
                                       "... --restart`")
        try:
            held = DirtyMap.load(TargetState.held_path(folder))
        except (BlocktrackError, OSError):
            held = DirtyMap(hello.nchunks, hello.chunk_size)  # nothing known: everything will be resent
        if held.nchunks != hello.nchunks:
            held = DirtyMap(hello.nchunks, hello.chunk_size)
        state = saved
        state.attempt = hello.attempt
    else:
        state = TargetState(mid, hello.device, spec.path, hello.size, hello.chunk_size, attempt=hello.attempt)
    state.status, state.error = "receiving", ""
    held.save(TargetState.held_path(folder))
    state.save(folder)
    try:
        TargetState.reserve_room(folder)
    except BlocktrackError as exc:
        refuse(C.REFUSE_TARGET, f"no room left in the receiver's state folder: {exc}", DeviceError)

    digests = DigestMap(hello.nchunks, hello.chunk_size, hello.size)
    heartbeat = None
    target = None
    try:
        if conn.channel.stall_timeout:
            heartbeat = Heartbeat(conn.channel, C.reply(C.KEEPALIVE), conn.channel.stall_timeout / 3)
        if held.count() and not hello.verify_full:  # VERIFY_FULL reads every chunk back at the end anyway
            try:
                _read_back(spec.path, held, digests, hello, depth, progress)
            except BlocktrackError as exc:
                refuse(C.REFUSE_TARGET, f"cannot read back the chunks target {spec.path} holds: {exc}", DeviceError)
        try:
            target = _Target(spec, depth, hello.chunk_size)
        except BlocktrackError as exc:
            refuse(C.REFUSE_TARGET, str(exc), UsageError if isinstance(exc, UsageError) else DeviceError)
        conn.send(C.encode_accept(target_size, hello.nchunks, held.ranges()))
        if progress is not None:
            progress.event("migration", migration_id=mid, device=hello.device, target=spec.path, size=hello.size,
                           resume=hello.resume, attempt=hello.attempt, held_chunks=held.count())
        return _receive(conn, hello, target, held, digests, state, folder, progress)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if target is not None:
            try:
                target.writer.close()
            except BlocktrackError:
                pass
        TargetState.release_room(folder)


def _read_back(path: str, held: DirtyMap, digests: DigestMap, hello: C.Hello, depth: int, progress) -> None:
    """Resume: the digests of the chunks the target holds, from the target as it is now (read once,
    hashed in the reader's I/O threads). Anything that wrote the target since the last connection
    then differs from the sender's map at the cutover: no saved file is trusted for the data."""
    started = time.monotonic()
    for index, digest in digest_chunks(path, list(held), chunk_size=hello.chunk_size, size=hello.size,
                                       depth=depth).items():
        digests.set(index, digest)
    if progress is not None:
        progress.event("held_read_back", chunks=held.count(), seconds=round(time.monotonic() - started, 3))


def _receive(conn: _Connection, hello: C.Hello, target: _Target, held: DirtyMap, digests: DigestMap,
             state: TargetState, folder: Path, progress) -> dict:
    started = time.monotonic()
    source = FramedSource(conn)
    reader = StreamReader(source, chunk_size=hello.chunk_size)
    chunk = hello.chunk_size
    written_here = 0
    done_bytes = 0
    durable_at = 0
    acked_at = 0
    unflushed = 0  # device bytes written since the last flush (zero chunks count in full)

    def make_durable() -> None:
        nonlocal durable_at, unflushed
        target.writer.flush()
        held.save(TargetState.held_path(folder))
        durable_at = reader.offset
        unflushed = 0
        conn.send(C.encode_ack(reader.offset, durable_at))

    try:
        while True:
            record = reader.next_record()
            if record is None:
                break
            if record.kind == "eos":
                make_durable()
                continue
            if record.kind != "block":
                continue
            if record.device != hello.device:
                raise StreamError(f"block record for device {record.device!r} in the migration of {hello.device!r}",
                                  record.offset, record.device)
            offset, length = apply_block(reader, record, target, chunk, limit=hello.size, digests=digests)
            index = offset // chunk
            held.mark(index)
            written_here += 1
            target.chunks += 1
            done_bytes += length
            unflushed += length
            if unflushed >= DURABLE_EVERY:
                make_durable()
            elif reader.offset - acked_at >= chunk:
                acked_at = reader.offset
                conn.send(C.encode_ack(reader.offset, durable_at))
            if progress is not None:
                progress.update(done_bytes, None, device=hello.device)
        if not source.ended:
            raise StreamTruncated("the connection ended after a complete stream but without its END frame",
                                  conn.offset, hello.device)
        make_durable()
    except BaseException as exc:
        _interrupted(target, held, state, folder, conn, exc)
        raise

    if held.count() != hello.nchunks:
        missing = hello.nchunks - held.count()
        message = (f"the stream ended without {missing} of {hello.nchunks} chunks of {hello.device!r}: "
                   "the target is incomplete (an early finish)")
        state.status = "interrupted"
        state.save(folder)
        _send_error(conn, message)
        raise StreamError(message, device=hello.device)

    if hello.verify_full:
        scope = C.SCOPE_FULL
        digests = DigestMap(hello.nchunks, chunk, hello.size)
        for index, digest in digest_chunks(target.spec.path, range(hello.nchunks), chunk_size=chunk,
                                           size=hello.size).items():
            digests.set(index, digest)
    else:
        scope = C.SCOPE_MAP  # as written (flushed above: every I/O thread has stored its digest)
    state.status = "complete"
    state.save(folder)
    conn.send(C.encode_result(scope, written_here, held.count(), hello.nchunks, digests.raw))
    try:
        verdict, message = source.read_verdict()
    except (StreamError, PeerError) as exc:
        raise VerifyError(f"the sender went away before its verdict ({exc}); the target of {hello.device!r} "
                          "is complete but unverified") from None
    state.status = "verified" if verdict == C.VERDICT_VERIFIED else "mismatch"
    state.save(folder)
    if verdict != C.VERDICT_VERIFIED:
        raise VerifyError(f"the sender found that target {target.spec.path} does not match the source: {message}")
    return {
        "result": "verified",
        "migration_id": hello.migration_id.hex(),
        "device": hello.device,
        "target": target.spec.path,
        "size": hello.size,
        "attempt": hello.attempt,
        "chunks": written_here,
        "zero_chunks": target.zero_chunks,
        "chunks_held": held.count(),
        "target_chunks": hello.nchunks,
        "chunks_verified": hello.nchunks,
        "verify": C.SCOPE_NAMES[scope],
        "stream_bytes": reader.offset,
        "device_bytes": done_bytes,
        "seconds": round(time.monotonic() - started, 3),
        "direct_io": target.writer.direct,
        "message": message,
    }


def _send_error(conn: _Connection, message: str) -> None:
    try:
        conn.send(C.encode_error(message))
    except PeerError:
        pass


def _interrupted(target: _Target, held: DirtyMap, state: TargetState, folder: Path, conn: _Connection,
                 exc: BaseException) -> None:
    """Keep what is durable after a failure: record "interrupted", flush whole records, save the held
    map, say why.

    ``exc`` is the first error and the one reported; this clean-up must never replace it. What the
    clean-up itself can raise is a BlocktrackError: the writer's flush and the atomic saves turn
    every OSError into an IOFailure (errors.check), so that is what is caught. Its failures are
    added to the message instead. The record comes first and gets the room kept for it: when the
    target filled the filesystem that also holds the state folder, only that room is left."""
    if not isinstance(exc, (PeerError, StreamTruncated)):
        _send_error(conn, str(exc))
    lost = []
    TargetState.release_room(folder)
    was, state.status = state.status, "interrupted"
    state.error = str(exc)[:2000]
    try:
        state.save(folder)
    except BlocktrackError as problem:
        lost.append(f"the target's record could not be updated and still says {was!r} ({problem})")
    try:
        target.writer.flush()
        held.save(TargetState.held_path(folder))  # else the map saved at the last durable point stands
    except BlocktrackError:
        pass                        # a failed flush is the first error again; an older map is safe to resume from
    if isinstance(exc, (StreamError, PeerError)):
        # Same exception (class, exit code, offset), with the way out added to its message.
        exc.args = (f"{exc}; {_RESUME_HINT}",)
    if lost and isinstance(exc, BlocktrackError):
        exc.args = (f"{exc}; also, {'; '.join(lost)}",)
