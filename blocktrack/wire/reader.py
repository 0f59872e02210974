"""StreamReader: decode a block-migration stream record by record, validating everything.

Two envelopes, told apart by the first four bytes:

* ``"qemu"``: a whole QEMU migration stream (``QEVM``, version 3, a configuration section, the
  iterative sections ``block`` and ``ram`` as START/PART/END, the full sections ``timer`` and
  ``globalstate``, EOF, then the JSON description). Only the ``block`` section carries records; the
  rest is parsed, checked and skipped. Streams carrying guest RAM or device state other than the
  two full sections above are refused: they do not come from `-M none` and we cannot check them.
* ``"none"``: the bare block-section byte sequence: records, every iteration ended by an EOS
  record, the stream ending at EOF right after the final part, "progress 100, EOS" (what QEMU's
  block_save_complete and our writer's finish() send last).

The clean end is EOF of the underlying stream, so a sender on a socket must shut down its write
side when it is done. With the "none" envelope an EOF is a clean end only right after the final
part, so a stream cut between two parts is refused; and the first part that ends with "progress
100, EOS" is the final part, so anything after it (another stream appended, a forged part) is
refused before it is yielded, and a receiver writes none of it. Our writer reports at most 99 in
the other parts of a bare stream; older writers could close a part with "progress 100, EOS" right
after the last chunk and then send the final part, so an empty repeat of the final part (those 16
bytes again, no data) is accepted. The "qemu" envelope has more to check (block section END, EOF
marker and JSON description must all be there), and its END section is what marks its final part.

The reader is a generator-driven state machine over a small read-ahead buffer. Payloads go
straight from the raw object into the caller's buffer (after whatever the read-ahead already
holds), so a 1 MiB chunk is copied at most once in Python.
"""

from __future__ import annotations

import json
from typing import Iterator

from blocktrack.errors import StreamError, StreamTruncated
from blocktrack.wire import layout as L
from blocktrack.wire.layout import Record, Section

_READ_AHEAD = 64 * 1024
_FINAL_PART = L.encode_progress(100) + L.EOS_RECORD    # how a bare stream's final part ends


class _Input:
    """Read-ahead over an object with RawIOBase-style readinto(); tracks the stream offset."""

    def __init__(self, raw):
        self._raw = raw
        self._buf = bytearray(_READ_AHEAD)
        self._view = memoryview(self._buf)
        self._pos = 0  # next unconsumed byte in _buf
        self._end = 0  # end of valid bytes in _buf
        self._base = 0  # stream offset of _buf[0]

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _readinto(self, view: memoryview) -> int:
        got = self._raw.readinto(view)
        if got is None:
            raise BlockingIOError("the stream's raw object is non-blocking and has no data yet")
        if got < 0 or got > len(view):
            raise StreamError(f"raw readinto() returned {got} for a {len(view)}-byte buffer", self.offset)
        return got

    def _fill(self, n: int) -> bool:
        """Make n bytes available; False when the stream ends first."""
        if self._end - self._pos >= n:
            return True
        if self._pos + n > len(self._buf):
            size = self._end - self._pos
            self._buf[:size] = self._buf[self._pos:self._end]
            self._base += self._pos
            self._pos, self._end = 0, size
        while self._end - self._pos < n:
            got = self._readinto(self._view[self._end:])
            if got == 0:
                return False
            self._end += got
        return True

    def peek_bytes(self, n: int) -> bytes:
        """Up to n bytes without consuming them (fewer only at the end of the stream)."""
        self._fill(n)
        return bytes(self._view[self._pos:min(self._end, self._pos + n)])

    def at_eof(self) -> bool:
        return not self._fill(1)

    def peek(self, what: str, start: int) -> int:
        if not self._fill(1):
            raise StreamTruncated(f"stream ended {what} (at byte {self.offset})", start)
        return self._buf[self._pos]

    def take(self, n: int, what: str, start: int, device: str | None = None) -> bytes:
        """Consume n bytes (n <= read-ahead size); StreamTruncated names ``what`` and ``start``."""
        if not self._fill(n):
            raise StreamTruncated(
                f"stream ended {what} (at byte {self._base + self._end}, {self._end - self._pos} of {n} bytes)",
                start, device)
        out = bytes(self._view[self._pos:self._pos + n])
        self._pos += n
        return out

    def u8(self, what: str, start: int) -> int:
        return self.take(1, what, start)[0]

    def be32(self, what: str, start: int) -> int:
        return L.BE32.unpack(self.take(4, what, start))[0]

    def be64(self, what: str, start: int) -> int:
        return L.BE64.unpack(self.take(8, what, start))[0]

    def readinto_exact(self, view: memoryview, what: str, start: int, device: str | None = None) -> None:
        """Fill view completely: first from the read-ahead, then straight from the raw object."""
        n = len(view)
        have = min(n, self._end - self._pos)
        view[:have] = self._view[self._pos:self._pos + have]
        self._pos += have
        done = have
        while done < n:
            got = self._readinto(view[done:])
            if got == 0:
                self._base += self._pos + done - have
                self._pos = self._end = 0
                raise StreamTruncated(
                    f"stream ended {what} (at byte {self._base}, {done} of {n} bytes)", start, device)
            done += got
        # The bytes that bypassed the read-ahead still count towards the offset.
        self._base += done - have


class StreamReader:
    """Decode the block records of a migration stream; see the module docstring.

    ``raw`` is any object with ``readinto(memoryview) -> int`` (0 = EOF). With ``trace_sections``
    the reader keeps a list of every envelope element in ``sections`` (tests and tools).
    """

    def __init__(self, raw, *, chunk_size: int = L.CHUNK_SIZE, trace_sections: bool = False):
        L.chunk_sectors(chunk_size)
        self.chunk_size = chunk_size
        self.envelope: str | None = None
        self.machine: str | None = None  # "qemu": machine name from the configuration section
        self.vmdesc: dict | None = None  # "qemu": the parsed JSON description
        self.sections: list[Section] | None = [] if trace_sections else None
        self._in = _Input(raw)
        self._gen: Iterator[Record] | None = None
        self._pending: Record | None = None  # block record whose payload is still unread
        self._error: StreamError | None = None
        self._done = False
        self._final_part_seen = False  # "none": did the last part end with "progress 100, EOS"?

    @property
    def offset(self) -> int:
        """Bytes consumed so far."""
        return self._in.offset

    # ---- public API ---------------------------------------------------------------------------

    def next_record(self) -> Record | None:
        """Next block-section record, or None at the clean, complete end of the stream."""
        if self._error is not None:
            raise self._error
        if self._pending is not None:
            rec = self._pending
            raise StreamError("next_record() called before the previous block record's payload was read",
                              rec.offset, rec.device)
        if self._done:
            return None
        try:
            if self._gen is None:
                self._gen = self._records()
            rec = next(self._gen)
        except StopIteration:
            self._done = True
            return None
        except StreamError as exc:
            self._error = exc
            raise
        if rec.kind == "block" and not rec.zero:
            self._pending = rec
        return rec

    def read_payload(self, buf) -> None:
        """Fill ``buf`` (chunk_size bytes, writable) with the pending block record's data."""
        rec = self._take_pending()
        view = memoryview(buf).cast("B")
        if len(view) != self.chunk_size:
            self._pending = rec
            raise ValueError(f"payload buffer has {len(view)} bytes, the chunk size is {self.chunk_size}")
        try:
            self._in.readinto_exact(view, "inside a block record's payload", rec.offset, rec.device)
        except StreamError as exc:
            self._error = exc
            raise

    def skip_payload(self) -> None:
        """Consume the pending block record's data without keeping it."""
        rec = self._take_pending()
        scratch = memoryview(bytearray(min(self.chunk_size, _READ_AHEAD)))
        left = self.chunk_size
        try:
            while left:
                n = min(left, len(scratch))
                self._in.readinto_exact(scratch[:n], "inside a block record's payload", rec.offset, rec.device)
                left -= n
        except StreamError as exc:
            self._error = exc
            raise

    def __iter__(self):
        """Iterate over records; block payloads are skipped unless the loop body reads them."""
        while True:
            if self._pending is not None:
                self.skip_payload()
            rec = self.next_record()
            if rec is None:
                return
            yield rec

    # ---- internals ----------------------------------------------------------------------------

    def _take_pending(self) -> Record:
        if self._error is not None:
            raise self._error
        rec = self._pending
        if rec is None:
            raise StreamError("no block record payload is pending", self.offset)
        self._pending = None
        return rec

    def _trace(self, **kw) -> None:
        if self.sections is not None:
            self.sections.append(Section(**kw))

    def _records(self) -> Iterator[Record]:
        if self._in.peek_bytes(4) == L.MAGIC_BYTES:
            self.envelope = "qemu"
            yield from self._qemu_stream()
        else:
            self.envelope = "none"
            yield from self._bare_stream()

    def _bare_stream(self) -> Iterator[Record]:
        while not self._final_part_seen:
            yield from self._block_body()
            if self._in.at_eof() and not self._final_part_seen:
                raise StreamTruncated("the stream ended between two parts, before its final part "
                                      "(progress 100 followed by EOS)", self._in.offset)
        inp = self._in
        while not inp.at_eof():                  # the final part was the end (module docstring)
            start = inp.offset
            if inp.peek_bytes(len(_FINAL_PART)) != _FINAL_PART:
                raise StreamError("records after the final part (progress 100, EOS) of a bare stream: it "
                                  "ended there, and nothing after it is written", start)
            inp.take(len(_FINAL_PART), "inside a repeated final part", start)
            yield Record("progress", start, percent=100)
            yield Record("eos", start + L.RECORD_WORD.size)

    def _block_body(self) -> Iterator[Record]:
        """Records up to and including EOS."""
        inp = self._in
        last_percent = None  # the progress record right before EOS, if that is what came last
        while True:
            start = inp.offset
            word = inp.be64("inside a record header (or before the end-of-section record)", start)
            kind, value, zero = L.classify_word(word, start, self.chunk_size)
            if kind == "eos":
                # A final part (QEMU's block_save_complete, our finish()) is "progress 100, EOS".
                self._final_part_seen = last_percent == 100
                yield Record("eos", start)
                return
            if kind == "progress":
                last_percent = value
                yield Record("progress", start, percent=value)
                continue
            last_percent = None
            length = inp.u8("before a block record's device name", start)
            if length == 0:
                raise StreamError("block record with an empty device name", start)
            device = L.decode_device_name(inp.take(length, "inside a block record's device name", start), start)
            yield Record("block", start, device=device, sector=value, zero=zero)

    # ---- the QEMU envelope --------------------------------------------------------------------

    def _qemu_stream(self) -> Iterator[Record]:
        inp = self._in
        magic = inp.be32("inside the stream header", 0)
        if magic != L.QEMU_VM_FILE_MAGIC:  # cannot happen (detected), kept for the reader's sake
            raise StreamError(f"bad magic {magic:#010x}", 0)
        version = inp.be32("inside the stream header", 0)
        if version == L.QEMU_VM_FILE_VERSION_COMPAT:
            raise StreamError("QEMU savevm format version 2 is obsolete", 4)
        if version != L.QEMU_VM_FILE_VERSION:
            raise StreamError(f"unsupported migration stream version {version}", 4)
        self._configuration()

        by_id: dict[int, str] = {}  # section id -> idstr, for every START/FULL seen
        open_iterative: dict[int, str] = {}  # started, not yet ended
        ended: set[str] = set()
        full_names: list[str] = []
        while True:
            start = inp.offset
            stype = inp.u8("before the next section (no EOF marker)", start)
            if stype == L.QEMU_VM_EOF:
                self._trace(kind="EOF", offset=start)
                break
            if stype in (L.QEMU_VM_SECTION_START, L.QEMU_VM_SECTION_FULL):
                sid = inp.be32("inside a section header", start)
                nlen = inp.u8("inside a section header", start)
                raw_name = inp.take(nlen, "inside a section name", start)
                instance_id = inp.be32("inside a section header", start)
                version_id = inp.be32("inside a section header", start)
                try:
                    name = raw_name.decode("ascii")
                except UnicodeDecodeError:
                    raise StreamError(f"section name {raw_name!r} is not ASCII", start) from None
                kind = L.SECTION_TYPE_NAMES[stype]
                known = L.ITERATIVE_SECTIONS if stype == L.QEMU_VM_SECTION_START else L.FULL_SECTIONS
                if name not in known:
                    raise StreamError(f"unknown or unsupported {kind} section {name!r}", start)
                if sid in by_id:
                    raise StreamError(f"section id {sid} of {name!r} is already used by {by_id[sid]!r}", start)
                if name in by_id.values():
                    raise StreamError(f"section {name!r} started twice", start)
                if instance_id != 0:
                    raise StreamError(f"section {name!r} has instance id {instance_id}, expected 0", start)
                if version_id != known[name]:
                    raise StreamError(f"section {name!r} has version {version_id}, expected {known[name]}", start)
                by_id[sid] = name
                if stype == L.QEMU_VM_SECTION_START:
                    open_iterative[sid] = name
                    self._trace(kind=kind, offset=start, section_id=sid, name=name,
                                instance_id=instance_id, version_id=version_id)
                    yield from self._iterative_body(name, start, first=True)
                else:
                    full_names.append(name)
                    body = self._full_body(name, start)
                    self._trace(kind=kind, offset=start, section_id=sid, name=name,
                                instance_id=instance_id, version_id=version_id, body=body)
            elif stype in (L.QEMU_VM_SECTION_PART, L.QEMU_VM_SECTION_END):
                sid = inp.be32("inside a section header", start)
                kind = L.SECTION_TYPE_NAMES[stype]
                if sid not in open_iterative:
                    if sid in by_id:
                        raise StreamError(f"{kind} section for {by_id[sid]!r} (id {sid}), which is not open", start)
                    raise StreamError(f"{kind} section with unknown section id {sid}", start)
                name = open_iterative[sid]
                self._trace(kind=kind, offset=start, section_id=sid, name=name)
                yield from self._iterative_body(name, start, first=False)
                if stype == L.QEMU_VM_SECTION_END:
                    del open_iterative[sid]
                    ended.add(name)
            elif stype in L.SECTION_TYPE_NAMES:
                raise StreamError(f"unexpected {L.SECTION_TYPE_NAMES[stype]} element (type {stype:#04x})", start)
            else:
                raise StreamError(f"unknown section type {stype:#04x}", start)
            self._footer(sid, start)

        eof_at = inp.offset - 1
        if L.BLOCK_SECTION not in by_id.values():
            raise StreamError("migration stream has no block section (block migration was not enabled)", eof_at)
        if open_iterative:
            names = ", ".join(sorted(open_iterative.values()))
            raise StreamError(f"EOF marker before the END of section(s) {names}: incomplete migration", eof_at)
        self._vmdesc(full_names)

    def _configuration(self) -> None:
        inp = self._in
        start = inp.offset
        stype = inp.u8("before the configuration section", start)
        if stype != L.QEMU_VM_CONFIGURATION:
            raise StreamError(f"configuration section missing (found type {stype:#04x})", start)
        length = inp.be32("inside the configuration section", start)
        if not 1 <= length <= L.MAX_MACHINE_NAME_LEN:
            raise StreamError(f"machine name length {length} in the configuration section", start)
        raw = inp.take(length, "inside the machine name", start)
        try:
            self.machine = raw.decode("ascii")
        except UnicodeDecodeError:
            raise StreamError(f"machine name {raw!r} is not ASCII", start) from None
        if not self.machine.isprintable():
            raise StreamError(f"machine name {raw!r} is not printable", start)
        seen: set[str] = set()
        while inp.peek("after the configuration section", start) == L.QEMU_VM_SUBSECTION:
            sub_start = inp.offset
            inp.u8("", sub_start)
            name = inp.take(inp.u8("inside a subsection header", sub_start), "inside a subsection name",
                            sub_start).decode("ascii", "replace")
            version = inp.be32("inside a subsection header", sub_start)
            if name in seen:
                raise StreamError(f"configuration subsection {name!r} twice", sub_start)
            seen.add(name)
            if version != 1:
                raise StreamError(f"configuration subsection {name!r} has version {version}", sub_start)
            if name == L.CONFIG_SUBSECTION_TARGET_PAGE_BITS:
                inp.be32("inside a subsection", sub_start)
            elif name == L.CONFIG_SUBSECTION_UUID:
                inp.take(16, "inside a subsection", sub_start)
            elif name == L.CONFIG_SUBSECTION_CAPABILITIES:
                count = inp.be32("inside a subsection", sub_start)
                if count > L.MAX_CAPABILITIES:
                    raise StreamError(f"{count} capabilities in the configuration section", sub_start)
                for _ in range(count):
                    cap = inp.take(inp.u8("inside a subsection", sub_start), "inside a subsection", sub_start)
                    if not cap or not all(0x21 <= b < 0x7F for b in cap):
                        raise StreamError(f"capability name {cap!r}", sub_start)
            else:
                raise StreamError(f"unknown configuration subsection {name!r}", sub_start)
        self._trace(kind="CONFIGURATION", offset=start, name=self.machine, body=bytes(raw))

    def _iterative_body(self, name: str, start: int, first: bool) -> Iterator[Record]:
        if name == L.BLOCK_SECTION:
            yield from self._block_body()
            return
        # ram: `-M none` has no RAM. Setup sends MEM_SIZE with a total of 0, every body ends with EOS.
        inp = self._in
        if first:
            at = inp.offset
            word = inp.be64("inside the ram section", start)
            if word != L.RAM_SAVE_FLAG_MEM_SIZE:
                if word & L.RAM_SAVE_FLAG_MEM_SIZE:
                    raise StreamError(f"stream carries {word & ~0xFFF} bytes of guest RAM; only streams of "
                                      "machines without RAM (-M none) are supported", at)
                raise StreamError(f"ram section setup word {word:#x}, expected MEM_SIZE", at)
        at = inp.offset
        word = inp.be64("inside the ram section", start)
        if word != L.RAM_SAVE_FLAG_EOS:
            raise StreamError(f"ram section carries data (word {word:#x}); only streams without RAM are supported", at)

    def _full_body(self, name: str, start: int) -> bytes:
        inp = self._in
        if name == L.TIMER_SECTION:
            body = inp.take(L.TIMER_BODY_LEN, "inside the timer section", start)
        else:
            body = inp.take(L.GLOBALSTATE_BODY_LEN, "inside the globalstate section", start)
            size = L.BE32.unpack_from(body)[0]
            runstate = body[4:]
            if not 2 <= size <= L.GLOBALSTATE_RUNSTATE_LEN or runstate[size - 1] != 0:
                raise StreamError(f"globalstate size {size} does not match its runstate", start)
            text = runstate[:size - 1]
            if not all(0x61 <= b <= 0x7A or b == 0x2D for b in text):  # RunState names: [a-z-]+
                raise StreamError(f"globalstate runstate {text!r} is not a run state name", start)
        if inp.peek(f"after the {name} section", start) == L.QEMU_VM_SUBSECTION:
            raise StreamError(f"{name} section has a subsection (icount?), which is not supported", inp.offset)
        return body

    def _footer(self, sid: int, start: int) -> None:
        inp = self._in
        at = inp.offset
        mark = inp.u8("before a section footer", start)
        if mark != L.QEMU_VM_SECTION_FOOTER:
            raise StreamError(f"missing section footer (found {mark:#04x}) for section id {sid}", at)
        fid = inp.be32("inside a section footer", start)
        if fid != sid:
            raise StreamError(f"section footer for id {fid} closes section id {sid}", at)

    def _vmdesc(self, full_names: list[str]) -> None:
        inp = self._in
        start = inp.offset
        stype = inp.u8("after the EOF marker, before the JSON description", start)
        if stype != L.QEMU_VM_VMDESCRIPTION:
            raise StreamError(f"expected the JSON description after EOF, found type {stype:#04x}", start)
        length = inp.be32("inside the JSON description header", start)
        if length > L.MAX_VMDESC_LEN:
            raise StreamError(f"JSON description of {length} bytes", start)
        text = bytearray(length)
        inp.readinto_exact(memoryview(text), "inside the JSON description", start)
        try:
            desc = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise StreamError(f"JSON description does not parse: {exc}", start) from None
        devices = desc.get("devices") if isinstance(desc, dict) else None
        if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
            raise StreamError("JSON description has no list of devices", start)
        names = [d.get("name") for d in devices]
        if names != full_names:
            raise StreamError(f"JSON description lists devices {names}, the stream has {full_names}", start)
        self.vmdesc = desc
        self._trace(kind="VMDESCRIPTION", offset=start, body=bytes(text))
        if not inp.at_eof():
            raise StreamError("data after the end of the migration stream", inp.offset)
