"""LiveMigration: the sender's state machine, from a live tracked device to a verified cutover.

    SETUP ─► BULK ─► DIRTY passes ─► CUTOVER ─► FINAL ─► VERIFY ─► DONE
      └────────┴──────────┴─────────────┴──────────┴────────┴────► FAILED

SETUP   start tracking (``TrackedSource.start``; on --resume it also reports what may have been
        written since the saved checkpoint), connect, HELLO → ACCEPT (the receiver checked the
        target's size and, on resume, the migration id, and says which chunks it already holds;
        it read their digests back from the target meanwhile, sending keep-alives). On resume, a
        chunk below the bulk cursor that the receiver no longer holds is owed again, and the
        chunks it holds that we do not owe are read once from the source to digest them (see
        "Digest map" below).
BULK    every chunk from the bulk cursor up, in order, as QEMU's bulk phase: each chunk's dirty bit is
        cleared *before* its read is submitted (``forget``), so a write racing the read marks it
        again (invariant 1). On resume, a chunk the receiver holds is skipped unless it may have
        changed since (saved as owed, or written after the checkpoint, or written in this run).
DIRTY   passes: take the dirty set (cleared atomically), send it, repeat. Before each pass:
            pending = dirty chunks x chunk size + bytes not yet durable on the target
        (the remaining bulk is zero here by construction: QEMU 7.2 forgot it and finished early;
        invariant 2), and the link rate is *measured* (what the receiver acknowledged per busy
        second, link.MeteredSink). Cut over when pending / rate <= --max-downtime and nothing is in
        flight any more (the receiver acknowledged everything as flushed and synced). After
        --max-passes passes without that, say so with the numbers, then --on-no-converge:
        keep-going (warn again every --max-passes passes), throttle (slow the writers to half the
        link rate, halving again each time), or stop (fail cleanly, resumable).
CUTOVER freeze the source (new writes held, in-flight ones finished and marked). If the dirty set
        taken now is after all too big for the budget (writes landed between the estimate and the
        freeze), thaw at once and send it as one more pass.
FINAL   take the last dirty set and send it as the stream's final part; END.
VERIFY  the receiver flushes and sends its whole digest map (or, --verify full, the digests of every
        chunk read back); we compare it with ours (or with the frozen source read again). Only a
        full match of every chunk of the device — and a receiver that holds every chunk — is
        success (invariant 3); a mismatch marks those chunks owed, thaws, and stays resumable.
        Downtime = freeze → comparison done.
DONE    the source stays frozen: the caller keeps it so until `blocktrack release`.
FAILED  thaw if frozen (the source stays the primary copy), save a checkpoint, re-raise.

Digest map (verify.DigestMap). Every chunk we send is digested (XXH3-128) from the buffer we sent it
from, right after the send (then it is in this core's cache: hashing the O_DIRECT buffer before
anything touched it ran at a fifth of the speed, memory-bound), and the digest replaces the chunk's entry: the map always holds the
digest of each chunk's latest contents as sent. A chunk's contents can change after that only by a
tracked write, which marks it dirty, so it is sent (and digested) again before the cutover, or it
is in the frozen final part. So at the cutover the map is the frozen source's, chunk for chunk.
On resume the map is not saved anywhere to be trusted: chunks that will be sent get their digests
when sent, and the others (held by the receiver, not owed) are read once from the source after
tracking started, so a write racing that read is tracked and sent again. The cost: one read of the
held part of the source per resume (the receiver reads the same part of the target back).

Resume bookkeeping (see savedstate.py for the invariant). ``carry`` holds chunks the engine owes
beyond the tracker's own dirty map: what an earlier run owed, and what checkpoints moved out of
the tracker (a checkpoint takes the dirty set into ``carry`` so the saved map is complete). The
link keeps a log of (stream end offset, chunk) for every chunk sent and not yet acknowledged as
durable; those are owed too, and the durable bulk cursor is the first unacknowledged bulk chunk.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from blocktrack.backends.base import fault_point
from blocktrack.directio import ChunkReader, is_zero
from blocktrack.dirtymap import DirtyMap
from blocktrack.errors import BlocktrackError, DeviceError
from blocktrack.kernel.blockdev import device_size
from blocktrack.migrate.failures import NotConverging, VerifyError
from blocktrack.migrate.link import MeteredSink, ReceiverLink
from blocktrack.migrate.savedstate import SourceState
from blocktrack.migrate.verify import DigestMap, chunk_digest, chunk_list, digest_chunks
from blocktrack.transport import RateLimitedSink
from blocktrack.wire import SECTOR_SIZE, StreamWriter
from blocktrack.wire import control as C

PART_CHUNKS = 64
FREEZE_COST_ABORTS = 3   # aborted cutovers before a final set no bigger than theirs is accepted
MIN_THROTTLE = 64 << 10


@dataclass
class Options:
    max_downtime: float = 0.3          # seconds
    max_passes: int = 30
    on_no_converge: str = "keep-going"  # keep-going | throttle | stop
    verify: str = "digest"              # digest | full
    rate_limit: int | None = None      # bytes per second on the link
    depth: int = 8
    envelope: str = "qemu"
    checkpoint_interval: float = 0.5    # seconds between resume checkpoints (when the receiver acked more)
    freeze_timeout: float = 60.0
    result_timeout: float | None = None


def _merge(into: DirtyMap, other: DirtyMap) -> None:
    for first, last in other.ranges():
        into.mark(first, last - first + 1)


class LiveMigration:
    def __init__(self, source, state: SourceState, folder: Path, options: Options,
                 report: Callable[[str, dict], None], *, resume: bool = False, link_factory=ReceiverLink):
        self.source = source
        self.state = state
        self.folder = Path(folder)
        self.opt = options
        self.report = report
        self.resume = resume
        self.link_factory = link_factory
        self.chunk = source.chunk_size
        self.size = source.size
        self.nchunks = -(-self.size // self.chunk)
        self.spc = self.chunk // SECTOR_SIZE
        self.name = state.name
        self.phase = "setup"
        self.link: ReceiverLink | None = None
        self.writer: StreamWriter | None = None
        self.reader: ChunkReader | None = None
        self.meter: MeteredSink | None = None
        self.carry = DirtyMap(self.nchunks, self.chunk)
        self.digests = DigestMap(self.nchunks, self.chunk, self.size)   # each chunk as last sent
        self.log: deque = deque()          # (stream end offset, chunk, bulk?) sent, not yet durable
        self.bulk_next = 0
        self.pass_chunks: list[int] = []
        self.pass_pos = 0
        self.held: set[int] = set()         # chunks the receiver held when this attempt began
        self.resend: set[int] = set()       # held, unacknowledged at the checkpoint, unwritten since
        self.frozen = False
        self.tracking = False
        self.passes = 0
        self.current_pass = 0               # the pass being sent (bulk 0), for progress
        self.sent_chunks = 0
        self.sent_bytes = 0
        self.zero_chunks = 0
        self.resent_bytes = 0
        self.skipped_chunks = 0
        self.final_chunks = 0
        self.aborted_cutovers = 0
        self.freeze_s: float | None = None
        self.min_aborted_final = 1 << 62
        self.final_dirty_s: float | None = None
        self.final_sent_s: float | None = None
        self.verified_chunks = 0
        self.pass_log: list[dict] = []
        self.throttle_rate: float | None = None
        self.dirty_rate: float | None = None
        self.downtime: float | None = None
        self.estimate: tuple[int, float | None] = (0, None)
        self._last_checkpoint = 0.0
        self._checkpoint_durable = -1
        self._last_progress = 0.0
        self._last_percent = -1
        self._tail = bytearray(self.chunk)
        self.started = time.monotonic()
        self._bytes_before = state.bytes_sent

    # -- the state machine ------------------------------------------------------------------------

    def run(self) -> dict:
        try:
            self._setup()
            self._bulk()
            self._dirty_passes()
            while not self._cutover():
                self._dirty_passes()
        except BaseException as exc:
            self._fail(exc)
            raise
        self._set_phase("done")
        summary = self.summary()
        self.state.phase = "frozen"
        self.state.result = summary
        self.state.save(self.folder)
        self._close_link()
        return summary

    def _set_phase(self, phase: str, **fields) -> None:
        self.phase = phase
        if phase not in ("done", "failed"):
            self.state.phase = phase
        self.report("phase", {"phase": phase, "pass": self.passes, **fields})

    def _setup(self) -> None:
        self._set_phase("setup", resume=self.resume, attempt=self.state.attempt + (1 if self.resume else 0))
        since, note = self.source.start(self.state.checkpoint if self.resume else None)
        self.tracking = True
        if note:
            self.report("warning", {"message": note})
        if self.resume:
            owed = self.state.load_owed(self.folder)
            if owed is None:
                owed = DirtyMap(self.nchunks, self.chunk)
                if self.state.checkpoint_seq:
                    owed.mark_all()
                    self.report("warning", {"message": "the saved map of owed chunks is missing: "
                                                       "every chunk is treated as dirty"})
            _merge(self.carry, owed)
            _merge(self.carry, since)
            self.bulk_next = min(self.state.bulk_cursor, self.nchunks)
            self.state.attempt += 1
        flags = (C.FLAG_RESUME if self.resume else 0) | (C.FLAG_VERIFY_FULL if self.opt.verify == "full" else 0)
        hello = C.Hello(bytes.fromhex(self.state.migration_id), self.name, self.size, self.chunk, flags,
                        self.state.attempt)
        self.link = self.link_factory(self.state.to, hello)
        if self.resume:
            self.held = set(self.link.accept.held)
            lost = [i for i in range(self.bulk_next) if i not in self.held and not self.carry.test(i)]
            if lost:
                # Below the cursor, yet not on the target (its record was lost or dropped): owed.
                for index in lost:
                    self.carry.mark(index)
                self.report("warning", {"message": f"the receiver does not hold {len(lost)} chunk(s) below the "
                                                   f"bulk cursor ({chunk_list(lost)}): they are sent again"})
            # What the interruption costs: chunks whose durable arrival was not yet acknowledged at
            # the checkpoint, that the receiver nevertheless holds, and that nobody wrote since.
            unacked = {i for first, last in self.state.unacked for i in range(first, last + 1)}
            self.resend = (unacked & self.held) - set(since)
        sink = self.link if not self.opt.rate_limit else RateLimitedSink(self.link, self.opt.rate_limit)
        self.meter = MeteredSink(self.link)
        self.writer = StreamWriter(sink, envelope=self.opt.envelope, chunk_size=self.chunk)
        self.reader = ChunkReader(self.source.path, chunk_size=self.chunk, depth=self.opt.depth)
        if self.resume and self.opt.verify != "full":  # --verify full reads the whole source at the end anyway
            self._digest_held()
        self.report("connected", {"to": self.state.to, "migration_id": self.state.migration_id,
                                  "attempt": self.state.attempt, "resume": self.resume,
                                  "target_size": self.link.accept.target_size,
                                  "held_chunks": len(self.held), "owed_chunks": self.carry.count(),
                                  "bulk_cursor": self.bulk_next, "direct_io": self.reader.direct})
        self.writer.start()
        self._checkpoint()

    def _digest_held(self) -> None:
        """Resume: digest the chunks the receiver holds and we do not owe (they are not sent again
        unless written), reading them from the source once (see "Digest map")."""
        started = time.monotonic()
        chunks = [i for i in sorted(self.held) if not self.carry.test(i)]
        for index, _data, digest in self.reader.read_digested(chunks):
            self.digests.set(index, digest)
            self.link.check()
        self.report("held_digested", {"chunks": len(chunks), "seconds": round(time.monotonic() - started, 3)})

    def _bulk(self) -> None:
        self._set_phase("bulk", bulk_cursor=self.bulk_next)
        held, carry, source = self.held, self.carry, self.source

        def chunks():
            for index in range(self.bulk_next, self.nchunks):
                if index in held and not carry.test(index):
                    self.skipped_chunks += 1
                    continue
                if carry.test(index):
                    carry.clear(index)
                source.forget(index)  # before the read is submitted: invariant 1
                yield index

        in_part = 0
        self.meter.busy(True)
        for index, data in self.reader.read(chunks()):
            self._send(index, data, bulk=True)
            self.bulk_next = index + 1
            percent = self.bulk_next * 100 // self.nchunks
            if percent != self._last_percent:
                self.writer.progress(percent)
                self._last_percent = percent
            in_part += 1
            if in_part == PART_CHUNKS:
                self.writer.end_part()
                in_part = 0
            self._tick()
        self.meter.busy(False)
        self.bulk_next = self.nchunks
        self.writer.end_part()

    def _dirty_passes(self) -> None:
        self._set_phase("dirty")
        warned_at = 0
        while True:
            self._tick(force_progress=True)
            dirty = self.source.dirty_count() + self.carry.count()
            in_flight = self._in_flight()
            pending = dirty * self.chunk + in_flight
            rate = self.meter.rate()
            self.estimate = (pending, rate)
            fits = (rate is not None and pending / rate <= self.opt.max_downtime) or (dirty == 0 and rate is None)
            if fits or dirty == 0:
                if in_flight:
                    # Let what is on the way arrive and be flushed (zero chunks cost the receiver
                    # writes, not link time) so the downtime holds only the final set.
                    self.link.mark()    # the receiver checks it got all of it (see control.MARK)
                    self.link.wait_durable(self.log[-1][0], 0.05)
                    continue
                return
            if self.passes and self.passes % self.opt.max_passes == 0 and self.passes != warned_at:
                warned_at = self.passes
                self._not_converging(pending, rate)
            self._dirty_pass()

    def _dirty_pass(self) -> None:
        chunks = self._take_all_dirty()
        self.pass_chunks, self.pass_pos = chunks, 0
        self.current_pass = self.passes + 1
        started = time.monotonic()
        sent_before = self.sent_bytes
        self.meter.busy(True)
        for index, data in self.reader.read(chunks):
            self._send(index, data, bulk=False)
            self.pass_pos += 1
            self._tick()
        self.meter.busy(False)
        self.writer.end_part()
        self.passes += 1
        seconds = time.monotonic() - started
        dirty_after = self.source.dirty_count() + self.carry.count()
        self.dirty_rate = dirty_after * self.chunk / seconds if seconds > 0 else None
        rate = self.meter.rate()
        record = {"pass": self.passes, "chunks": len(chunks), "bytes": self.sent_bytes - sent_before,
                  "seconds": round(seconds, 3), "dirty_after": dirty_after,
                  "dirty_mb_per_s": None if self.dirty_rate is None else round(self.dirty_rate / 1e6, 2),
                  "link_mb_per_s": None if rate is None else round(rate / 1e6, 2)}
        self.pass_log.append(record)
        self.report("pass", record)
        self.pass_chunks, self.pass_pos = [], 0
        self.current_pass = self.passes

    def _not_converging(self, pending: int, rate: float | None) -> None:
        rate_text = f"{rate / 1e6:.1f} MB/s" if rate else "an unmeasured rate"
        dirty_text = f"{self.dirty_rate / 1e6:.1f} MB/s" if self.dirty_rate is not None else "an unknown rate"
        need = f"{pending / rate:.2f} s" if rate else "an unknown time"
        message = (f"not converging after {self.passes} dirty passes: the writers dirty {dirty_text}, the link "
                   f"moves {rate_text}; the {pending / 1e6:.1f} MB pending would need {need} of downtime, "
                   f"more than the {self.opt.max_downtime * 1000:.0f} ms allowed")
        fields = {"passes": self.passes, "pending_bytes": pending,
                  "link_mb_per_s": None if rate is None else round(rate / 1e6, 2),
                  "dirty_mb_per_s": None if self.dirty_rate is None else round(self.dirty_rate / 1e6, 2),
                  "max_downtime_ms": round(self.opt.max_downtime * 1000), "message": message}
        mode = self.opt.on_no_converge
        if mode == "stop":
            self.report("not_converging", {**fields, "action": "stop"})
            raise NotConverging(f"{message}; stopped as --on-no-converge stop asks (nothing was cut over; "
                                "continue later with --resume)")
        if mode == "throttle":
            base = self.throttle_rate if self.throttle_rate is not None else (rate or self.chunk) * 1.0
            self.throttle_rate = max(MIN_THROTTLE, base / 2)
            if self.source.throttle(self.throttle_rate):
                action = f"throttling writes to {self.throttle_rate / 1e6:.2f} MB/s"
            else:
                action = "the backend cannot throttle writes: keeping going"
        else:
            action = "keeping going (--on-no-converge keep-going)"
        self.report("not_converging", {**fields, "action": action,
                                       "throttle_mb_per_s": None if self.throttle_rate is None
                                       else round(self.throttle_rate / 1e6, 3)})

    def _check_source(self) -> None:
        """The source must still be the device we started with (same size) when we cut over.

        A source lost under us (a disk gone, an image cut short) changes no chunk through the
        tracker, so the final part would be empty and digest-verify nothing: without this check a
        lost tail could end as "verified". Reads of a shrunk source fail on their own (short read);
        this catches the loss after the last read."""
        try:
            size = device_size(self.source.path)
        except BlocktrackError as exc:
            raise DeviceError(f"the source {self.source.path} is gone at the cutover: {exc}") from None
        if size != self.size:
            raise DeviceError(f"the source {self.source.path} is {size} bytes at the cutover, {self.size} when the "
                              "migration started: the source was lost or replaced, not cutting over")

    def _cutover(self) -> bool:
        """Freeze and finish; False (thawed again) when the last dirty set turned out too big."""
        fault_point("migrate.before-cutover")   # tests: change the target behind the receiver's back
        self._set_phase("cutover", pending_bytes=self.estimate[0],
                        link_mb_per_s=None if self.estimate[1] is None else round(self.estimate[1] / 1e6, 2))
        frozen_at = time.monotonic()
        if not self.source.freeze(self.opt.freeze_timeout):
            self.source.thaw()
            raise DeviceError(f"writes in flight on the source did not finish within {self.opt.freeze_timeout:.0f} s: "
                              "not cutting over")
        self.frozen = True
        self.freeze_s = time.monotonic() - frozen_at       # parts of the downtime: reported apart
        self._check_source()
        chunks = self._take_all_dirty()
        self.final_dirty_s = time.monotonic() - frozen_at - self.freeze_s
        rate = self.meter.rate()
        final_bytes = len(chunks) * self.chunk + self._in_flight()
        over_budget = bool(chunks and rate and final_bytes / rate > self.opt.max_downtime)
        if over_budget and self.aborted_cutovers >= FREEZE_COST_ABORTS and len(chunks) <= self.min_aborted_final:
            # The freeze itself dirties these: a filesystem frozen by dm suspend writes its superblock
            # and journal (ext4 always does), so every cutover finds them. Thawing again cannot make
            # the final set smaller; aborting forever would never finish. Go on, and say so.
            self.report("warning", {"message": f"the freeze itself dirties {len(chunks)} chunk(s) (a filesystem "
                                               f"writes its superblock and journal when frozen): at "
                                               f"{rate / 1e6:.2f} MB/s they need {final_bytes / rate * 1000:.0f} ms, "
                                               f"more than --max-downtime {self.opt.max_downtime * 1000:.0f}; "
                                               f"cutting over anyway after {self.aborted_cutovers} tries"})
            over_budget = False
        if over_budget:
            # Writes that landed between the estimate and the freeze (throttled ones are let go at
            # the freeze) made the last set too big for the budget: thaw, and send it as a pass.
            self.source.thaw()
            self.frozen = False
            for index in chunks:
                self.carry.mark(index)
            self.aborted_cutovers += 1
            self.min_aborted_final = min(self.min_aborted_final, len(chunks))
            self.report("cutover_aborted", {"final_chunks": len(chunks), "final_bytes": final_bytes,
                                            "link_mb_per_s": round(rate / 1e6, 2),
                                            "frozen_ms": round((time.monotonic() - frozen_at) * 1000, 1)})
            return False
        self._set_phase("final")
        self.pass_chunks, self.pass_pos = chunks, 0
        self.writer.begin_final()
        self.meter.busy(True)
        for index, data in self.reader.read(chunks):
            self._send(index, data, bulk=False)
            self.pass_pos += 1
            self.link.check()
        self.meter.busy(False)
        self.final_chunks = len(chunks)
        self.writer.finish()
        self.link.end()
        self.final_sent_s = time.monotonic() - frozen_at
        self._set_phase("verify", final_chunks=len(chunks), verify=self.opt.verify)
        if self.opt.verify == "full":
            expected = DigestMap(self.nchunks, self.chunk, self.size)
            for index, digest in digest_chunks(self.source.path, range(self.nchunks), chunk_size=self.chunk,
                                               size=self.size, depth=self.opt.depth).items():
                expected.set(index, digest)
            scope = C.SCOPE_FULL
        else:
            # Every chunk as sent (the frozen final part included): see "Digest map".
            expected, scope = self.digests, C.SCOPE_MAP
        result = self.link.wait_result(self.opt.result_timeout)
        problems = []
        if result.scope != scope:
            problems.append(f"the receiver digested scope {C.SCOPE_NAMES[result.scope]}, "
                            f"not {C.SCOPE_NAMES[scope]}")
        if result.chunks_held != self.nchunks:
            problems.append(f"the receiver holds {result.chunks_held} of {self.nchunks} chunks")
        unknown = expected.missing()
        if unknown:  # never expected: every chunk is digested as it is sent or, on resume, as held
            problems.append(f"no digest of the source for chunks {chunk_list(unknown)}")
        differ = sorted(set(expected.differ(result.digests)) - set(unknown))
        if differ:
            problems.append(f"chunks {chunk_list(differ)} differ")
        self.downtime = time.monotonic() - frozen_at
        if problems:
            message = f"verification of device {self.name!r} failed: " + "; ".join(problems)
            self.link.verdict(C.VERDICT_MISMATCH, message)
            for index in differ + unknown:
                self.carry.mark(index)
            raise VerifyError(f"{message} (downtime so far {self.downtime * 1000:.0f} ms); the source was thawed "
                              "and stays the primary copy")
        self.verified_chunks = self.nchunks
        self.link.verdict(C.VERDICT_VERIFIED, f"all {self.nchunks} chunks match the frozen source "
                                              f"({C.SCOPE_NAMES[scope]})")
        return True

    # -- helpers ----------------------------------------------------------------------------------

    def _take_all_dirty(self) -> list[int]:
        snap = self.source.take_dirty()
        _merge(snap, self.carry)
        self.carry = DirtyMap(self.nchunks, self.chunk)
        return list(snap)

    def _in_flight(self) -> int:
        """Stream bytes of chunks sent and not yet acknowledged as durable by the receiver (the
        envelope bytes after the last record are not counted: the receiver parses them only when
        the next record comes)."""
        durable = self.link.durable
        while self.log and self.log[0][0] <= durable:
            self.log.popleft()
        return self.log[-1][0] - durable if self.log else 0

    def _send(self, index: int, data, *, bulk: bool) -> None:
        sector = index * self.spc
        real = len(data)
        if is_zero(data):
            self.writer.block(self.name, sector, zero=True)
            self.zero_chunks += 1
        elif real == self.chunk:
            self.writer.block(self.name, sector, data)
        else:
            # The device's tail: the wire carries a whole chunk; the receiver writes the real part.
            self._tail[:real] = data
            self._tail[real:] = bytes(self.chunk - real)
            self.writer.block(self.name, sector, self._tail)
        # Hashed here, right after the send copied the chunk into the socket: it is in this core's
        # cache now (the O_DIRECT read left it in memory only, where hashing runs ~5x slower).
        self.digests.set(index, chunk_digest(data))
        self.log.append((self.writer.bytes_written, index, bulk))
        self.sent_chunks += 1
        self.sent_bytes += real
        if index in self.resend:
            self.resent_bytes += real
            self.resend.discard(index)
        self.meter.sample()

    def _tick(self, force_progress: bool = False) -> None:
        self.link.check()
        now = time.monotonic()
        if (now - self._last_checkpoint >= self.opt.checkpoint_interval
                and self.link.durable > self._checkpoint_durable):
            self._checkpoint()
        if force_progress or now - self._last_progress >= 0.1:
            self._last_progress = now
            self.report("progress", self._progress_fields())

    def progress_snapshot(self) -> dict:
        """The progress fields, for `blocktrack status` (asked from another thread: counters only,
        no call into the tracker, which the engine's thread may be using)."""
        return {"phase": self.phase, "pass": self.current_pass, "bulk_cursor": self.bulk_next,
                "chunks": self.nchunks, "percent": round(100.0 * self.bulk_next / self.nchunks, 1)
                if self.phase == "bulk" else None, "sent_bytes": self.sent_bytes, "size": self.size,
                "passes": self.passes, "aborted_cutovers": self.aborted_cutovers}

    def _progress_fields(self) -> dict:
        rate = self.meter.rate() if self.meter is not None else None
        dirty = self.source.dirty_count() + self.carry.count()
        if self.phase == "bulk":
            done, total = self.bulk_next, self.nchunks
            left = (self.nchunks - self.bulk_next + dirty) * self.chunk
        else:
            done, total = self.pass_pos, len(self.pass_chunks)
            left = dirty * self.chunk + (total - done) * self.chunk
        return {"phase": self.phase, "pass": self.current_pass,
                "percent": round(100.0 * done / total, 1) if total else 100.0,
                "mb_per_s": None if rate is None else round(rate / 1e6, 2),
                "eta_s": None if not rate else round(left / rate, 1),
                "dirty_chunks": dirty,
                "dirty_mb_per_s": None if self.dirty_rate is None else round(self.dirty_rate / 1e6, 2),
                "sent_bytes": self.sent_bytes, "size": self.size}

    def _checkpoint(self) -> None:
        """Save the resume point (see the module docstring); called between chunks, never mid-pass state."""
        token = self.source.checkpoint()
        _merge(self.carry, self.source.take_dirty())
        durable = self.link.durable if self.link is not None else 0
        while self.log and self.log[0][0] <= durable:
            self.log.popleft()
        owed = DirtyMap(self.nchunks, self.chunk)
        _merge(owed, self.carry)
        for index in self.pass_chunks[self.pass_pos:]:
            owed.mark(index)
        cursor = self.bulk_next
        unacked = DirtyMap(self.nchunks, self.chunk)
        for _end, index, bulk in self.log:
            unacked.mark(index)
            if bulk:
                cursor = min(cursor, index)
            else:
                owed.mark(index)
        self.state.unacked = unacked.ranges()
        self.state.bytes_sent = self._bytes_before + self.sent_bytes
        self.state.save_checkpoint(self.folder, owed, cursor, token)
        self._last_checkpoint = time.monotonic()
        self._checkpoint_durable = durable

    def _fail(self, exc: BaseException) -> None:
        self._set_phase("failed", error=str(exc) or type(exc).__name__)
        if self.frozen:
            self.source.thaw()
            self.frozen = False
        if self.tracking:
            self.source.throttle(None)
        kept = False
        if self.tracking:
            try:
                self._checkpoint()
                kept = True
            except Exception as problem:  # keep the first error; the older checkpoint stands
                self.report("warning", {"message": f"could not save the resume point: {problem}"})
        fresh_and_empty = not self.resume and (self.link is None or self.link.durable == 0)
        self.state.phase = {"VerifyError": "failed", "NotConverging": "stopped"}.get(type(exc).__name__,
                                                                                      "interrupted")
        self.state.result = {"result": "failed", "error": str(exc)}
        self._close_link()
        if fresh_and_empty:
            self.discard_state()
        else:
            self.state.save(self.folder)
            if kept:
                self.report("resumable", {"migration_id": self.state.migration_id, "bulk_cursor": self.state.bulk_cursor,
                                          "message": "continue with the same command and --resume"})

    def discard_state(self) -> None:
        for path in self.folder.glob("dirty-*.map"):
            path.unlink(missing_ok=True)
        for name in ("migration.json", "journal"):
            (self.folder / name).unlink(missing_ok=True)

    def _close_link(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.link is not None:
            self.link.close()

    def summary(self) -> dict:
        rate = self.meter.rate() if self.meter is not None else None
        return {
            "result": "verified",
            "migration_id": self.state.migration_id,
            "device": self.state.device,
            "name": self.name,
            "size": self.size,
            "attempt": self.state.attempt,
            "resumed": self.resume,
            "passes": self.passes,
            "final_chunks": self.final_chunks,
            "aborted_cutovers": self.aborted_cutovers,
            "chunks_sent": self.sent_chunks,
            "zero_chunks": self.zero_chunks,
            "sent_bytes": self.sent_bytes,
            "wire_bytes": self.writer.bytes_written if self.writer is not None else 0,
            "sent_ratio": round(self.sent_bytes / self.size, 3) if self.size else 0.0,
            "resent_bytes": self.resent_bytes,
            "skipped_chunks": self.skipped_chunks,
            "downtime_ms": None if self.downtime is None else round(self.downtime * 1000, 1),
            "freeze_ms": None if self.freeze_s is None else round(self.freeze_s * 1000, 1),
            "downtime_parts_ms": None if self.final_sent_s is None or self.downtime is None else {
                "freeze": round(self.freeze_s * 1000, 1), "final_dirty_set": round(self.final_dirty_s * 1000, 1),
                "final_pass": round((self.final_sent_s - self.freeze_s - self.final_dirty_s) * 1000, 1),
                "verify": round((self.downtime - self.final_sent_s) * 1000, 1)},
            "max_downtime_ms": round(self.opt.max_downtime * 1000),
            "verify": self.opt.verify,
            "verified_by": ("both devices read again at the cutover" if self.opt.verify == "full"
                            else "the digest maps of both ends, every chunk as sent and as written"),
            "chunks": self.nchunks,
            "chunks_verified": self.verified_chunks,
            "link_mb_per_s": None if rate is None else round(rate / 1e6, 2),
            "throttled_to_mb_per_s": None if self.throttle_rate is None else round(self.throttle_rate / 1e6, 3),
            "seconds": round(time.monotonic() - self.started, 3),
            "pass_log": self.pass_log,
        }
