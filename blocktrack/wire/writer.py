"""StreamWriter: write a block-migration stream the way QEMU 7.2 (`-M none`) writes one.

Call order: ``start()``, then any number of ``block()`` / ``progress()`` / ``end_part()``, optionally
``begin_final()``, and ``finish()``. Each part (iteration) is one body of the ``block`` section,
closed by an EOS record.

What QEMU 7.2 writes, and so what the "qemu" envelope gets (savevm.c, block.c, ram.c):

    "QEVM" be32 3                                   qemu_savevm_state_header()
    07 be32 len "none"                              configuration section
    01 <block id> "block" inst 0 ver 1  EOS  7e id  START: block_save_setup() sends only EOS
    01 <ram id> "ram" inst 0 ver 4  MEM_SIZE|0  EOS  7e id
    repeated per iteration:
      02 <block id>  records... EOS  7e id          PART: block_save_iterate()
      02 <ram id>  EOS  7e id                       ram_save_iterate() with no RAM
    03 <block id>  records... PROGRESS 100  EOS  7e id    END: block_save_complete()
    03 <ram id>  EOS  7e id
    04 <timer id> "timer" inst 0 ver 2  24 bytes  7e id
    04 <globalstate id> "globalstate" inst 0 ver 1  be32 8 "running" + NULs to 100 bytes  7e id
    00                                              QEMU_VM_EOF
    06 be32 len  JSON                               the description of the FULL sections

The "none" envelope is exactly the concatenation of the ``block`` section bodies above (so it starts
with the EOS of the empty setup part), which is what the receiver reads when it is not talking to
QEMU. There nothing but the final part's "PROGRESS 100, EOS" says where the stream ends, so parts
before the final one report at most 99 (QEMU's own iterations may say 100; its END section is what
ends its final part). The writer never concatenates payloads with headers: each chunk goes to ``raw.write`` as the
caller's own buffer.
"""

from __future__ import annotations

import json

from blocktrack.wire import layout as L

# The JSON description QEMU 7.2 writes for `-M none` (savevm.c qemu_savevm_state_complete_precopy_non_iterable,
# field lists from vmstate_timers and vmstate_globalstate). json.dumps' default separators match QEMU's qjson.
_VMDESC = {
    "page_size": 4096,
    "devices": [
        {"name": L.TIMER_SECTION, "instance_id": 0, "vmsd_name": L.TIMER_SECTION,
         "version": L.TIMER_SECTION_VERSION,
         "fields": [{"name": "cpu_ticks_offset", "type": "int64", "size": 8},
                    {"name": "unused", "type": "unused_buffer", "size": 8},
                    {"name": "cpu_clock_offset", "type": "int64", "size": 8}]},
        {"name": L.GLOBALSTATE_SECTION, "instance_id": 0, "vmsd_name": L.GLOBALSTATE_SECTION,
         "version": L.GLOBALSTATE_SECTION_VERSION,
         "fields": [{"name": "size", "type": "uint32", "size": 4},
                    {"name": "runstate", "type": "buffer", "size": L.GLOBALSTATE_RUNSTATE_LEN}]},
    ],
}
VMDESC_JSON = json.dumps(_VMDESC).encode("ascii")

# Timer offsets are live clock values in QEMU's stream; a blocktrack stream has no guest clock.
TIMER_BODY = bytes(L.TIMER_BODY_LEN)
_RUNSTATE = b"running"
GLOBALSTATE_BODY = L.BE32.pack(len(_RUNSTATE) + 1) + _RUNSTATE.ljust(L.GLOBALSTATE_RUNSTATE_LEN, b"\0")

_NEW, _IDLE, _PART, _FINISHED = "new", "idle", "part", "finished"


class StreamWriter:
    """Encode a block-migration stream onto ``raw`` (an object whose write() takes bytes-likes).

    ``machine`` names the machine in the configuration section ("none" is what QEMU writes for
    `-M none`; a QEMU loading the stream refuses any other name than its own).
    """

    def __init__(self, raw, *, envelope: str = "qemu", chunk_size: int = L.CHUNK_SIZE, machine: str = "none"):
        if envelope not in ("qemu", "none"):
            raise ValueError(f"unknown envelope {envelope!r}")
        self._sectors_per_chunk = L.chunk_sectors(chunk_size)
        raw_machine = machine.encode("ascii")
        if not 1 <= len(raw_machine) <= L.MAX_MACHINE_NAME_LEN or not machine.isprintable():
            raise ValueError(f"bad machine name {machine!r}")
        self._raw = raw
        self._machine = raw_machine
        self.envelope = envelope
        self.chunk_size = chunk_size
        self.bytes_written = 0
        self._state = _NEW
        self._final = False  # the next part opened is the last one (END section)
        self._names: dict[str, bytes] = {}  # device name -> encoded u8 length + name

    # ---- public API ---------------------------------------------------------------------------

    def start(self) -> None:
        """Stream header and the (empty) setup part."""
        self._expect(_NEW, "start()")
        if self.envelope == "qemu":
            self._write(
                L.BE32.pack(L.QEMU_VM_FILE_MAGIC) + L.BE32.pack(L.QEMU_VM_FILE_VERSION)
                + bytes([L.QEMU_VM_CONFIGURATION]) + L.BE32.pack(len(self._machine)) + self._machine
                + L.section_header(L.QEMU_VM_SECTION_START, L.BLOCK_SECTION_ID, L.BLOCK_SECTION, 0,
                                   L.BLOCK_SECTION_VERSION)
                + L.EOS_RECORD + L.section_footer(L.BLOCK_SECTION_ID)
                + L.section_header(L.QEMU_VM_SECTION_START, L.RAM_SECTION_ID, L.RAM_SECTION, 0,
                                   L.RAM_SECTION_VERSION)
                + L.RAM_MEM_SIZE_NONE + L.RAM_EOS + L.section_footer(L.RAM_SECTION_ID))
        else:
            self._write(L.EOS_RECORD)
        self._state = _IDLE

    def block(self, device: str, sector: int, data=None, *, zero: bool = False) -> None:
        """One chunk: ``data`` is exactly chunk_size bytes (the caller pads a device's tail);
        ``zero=True`` sends the ZERO_BLOCK header alone."""
        name = self._names.get(device)
        if name is None:
            name = self._names[device] = L.encode_device_name(device)
        if not isinstance(sector, int) or sector < 0 or sector % self._sectors_per_chunk:
            raise ValueError(f"sector {sector!r} is not a chunk-aligned sector number")
        if sector * L.SECTOR_SIZE > L.MAX_BYTE_OFFSET - self.chunk_size:
            raise ValueError(f"sector {sector} is out of range")
        if zero:
            if data is not None:
                raise ValueError("a ZERO_BLOCK record carries no data")
            flags = L.FLAG_DEVICE_BLOCK | L.FLAG_ZERO_BLOCK
        else:
            if data is None:
                raise ValueError("a block record needs data (or zero=True)")
            data = memoryview(data)
            if data.nbytes != self.chunk_size:
                raise ValueError(f"block data has {data.nbytes} bytes, the chunk size is {self.chunk_size}")
            flags = L.FLAG_DEVICE_BLOCK
        self._open_part("block()")
        self._write(L.RECORD_WORD.pack((sector << L.SECTOR_BITS) | flags) + name)
        if not zero:
            self._write(data)

    def progress(self, percent: int) -> None:
        """A progress record. "progress 100, EOS" is how the final part ends, and in a bare stream it
        is the end of the stream (reader.py): a part before the final one reports at most 99. (QEMU's
        envelope marks its final part with the END section, but the block section's bytes are the same
        in both envelopes.)"""
        record = L.encode_progress(percent)               # checks the range
        if percent == 100 and not self._final:
            record = L.encode_progress(99)
        self._open_part("progress()")
        self._write(record)

    def end_part(self) -> None:
        """Close this iteration: EOS (an empty part if nothing was written since the last one)."""
        if self._final:
            raise ValueError("end_part() after begin_final(): the final part is closed by finish()")
        self._open_part("end_part()")
        self._close_part()

    def begin_final(self) -> None:
        """Make the next records part of the final part (QEMU's END section, sent at cutover).

        A part still open is closed first, as end_part() would."""
        self._expect_started("begin_final()")
        if self._state == _PART and not self._final:
            self._close_part()
        self._final = True

    def finish(self) -> None:
        """The final part (progress 100, EOS) and, for "qemu", the rest of the stream.

        A non-final part still open is closed first, as end_part() would. The raw object is flushed
        if it has flush(); a socket sender must still shut down its write side (the reader's clean
        end is EOF)."""
        self._expect_started("finish()")
        if self._state == _PART and not self._final:
            self._close_part()
        self._final = True
        self._open_part("finish()")
        self._write(L.encode_progress(100))
        self._close_part()
        if self.envelope == "qemu":
            self._write(
                L.section_header(L.QEMU_VM_SECTION_END, L.RAM_SECTION_ID) + L.RAM_EOS
                + L.section_footer(L.RAM_SECTION_ID)
                + L.section_header(L.QEMU_VM_SECTION_FULL, L.TIMER_SECTION_ID, L.TIMER_SECTION, 0,
                                   L.TIMER_SECTION_VERSION)
                + TIMER_BODY + L.section_footer(L.TIMER_SECTION_ID)
                + L.section_header(L.QEMU_VM_SECTION_FULL, L.GLOBALSTATE_SECTION_ID, L.GLOBALSTATE_SECTION, 0,
                                   L.GLOBALSTATE_SECTION_VERSION)
                + GLOBALSTATE_BODY + L.section_footer(L.GLOBALSTATE_SECTION_ID)
                + bytes([L.QEMU_VM_EOF, L.QEMU_VM_VMDESCRIPTION]) + L.BE32.pack(len(VMDESC_JSON)) + VMDESC_JSON)
        self._state = _FINISHED
        flush = getattr(self._raw, "flush", None)
        if flush is not None:
            flush()

    # ---- internals ----------------------------------------------------------------------------

    def _write(self, data) -> None:
        view = memoryview(data)
        n = view.nbytes
        done = self._raw.write(view)
        # BufferedWriter and sendall-style wrappers write everything; a raw FileIO may not.
        while done is not None and done < n:
            step = self._raw.write(view[done:])
            if not step:
                raise OSError(f"write() made no progress after {done} of {n} bytes")
            done += step
        self.bytes_written += n

    def _expect(self, state: str, what: str) -> None:
        if self._state != state:
            raise ValueError(f"{what} is not allowed now (writer state {self._state!r})")

    def _expect_started(self, what: str) -> None:
        if self._state in (_NEW, _FINISHED):
            raise ValueError(f"{what} is not allowed now (writer state {self._state!r})")

    def _open_part(self, what: str) -> None:
        self._expect_started(what)
        if self._state == _PART:
            return
        if self.envelope == "qemu":
            kind = L.QEMU_VM_SECTION_END if self._final else L.QEMU_VM_SECTION_PART
            self._write(L.section_header(kind, L.BLOCK_SECTION_ID))
        self._state = _PART

    def _close_part(self) -> None:
        """EOS; for "qemu" also the footer and the ram section's matching part, as QEMU interleaves them."""
        if self.envelope == "qemu":
            if self._final:
                self._write(L.EOS_RECORD + L.section_footer(L.BLOCK_SECTION_ID))
            else:
                self._write(L.EOS_RECORD + L.section_footer(L.BLOCK_SECTION_ID)
                            + L.section_header(L.QEMU_VM_SECTION_PART, L.RAM_SECTION_ID) + L.RAM_EOS
                            + L.section_footer(L.RAM_SECTION_ID))
        else:
            self._write(L.EOS_RECORD)
        self._state = _IDLE
