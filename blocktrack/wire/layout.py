"""Byte layouts of QEMU's block-migration stream: constants, records and the header codec.

Everything here is pure (no I/O). ``reader.py`` and ``writer.py`` build on it; no other module of
blocktrack may know these layouts.

All integers on the wire are big-endian (QEMU's ``qemu_put_be32``/``qemu_put_be64``).

Sources: QEMU v7.2 ``migration/block.c`` (the ``block`` section), ``migration/savevm.h`` and
``migration/savevm.c`` (the envelope), ``migration/ram.c`` (the ``ram`` section), ``softmmu/cpu-timers.c``
(``timer``) and ``migration/global_state.c`` (``globalstate``). Every value below was also checked
against streams written by Debian's qemu-system-x86 7.2 (see tests/host/test_qemu_wire.py).

The ``block`` section body is a sequence of records, each starting with one be64 word:

    word = (sector << 9) | flags            block.c: blk_send(), qemu_put_be64(f, (sector << BDRV_SECTOR_BITS) | flags)

    flags & DEVICE_BLOCK   followed by  u8 name length, name bytes (no NUL),
                           then CHUNK_SIZE bytes of data unless flags & ZERO_BLOCK.
                           ``sector`` is the first 512-byte sector of the chunk.
    flags == PROGRESS      ``sector`` carries a percentage (block.c: (progress << BDRV_SECTOR_BITS) | PROGRESS).
    flags == EOS           ends the section body (one iteration); ``sector`` is 0.

QEMU always sends a whole CHUNK_SIZE payload, also for the last chunk of a device whose size is not
a multiple of it; the bytes past the device end are whatever its buffer held (block.c mallocs the
buffer and reads only ``nr_sectors``). Receivers must write only ``min(chunk, size - offset)``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from blocktrack.errors import StreamError, StreamTruncated

# ---------------------------------------------------------------------------------------------
# The block section (migration/block.c)
# ---------------------------------------------------------------------------------------------

SECTOR_BITS = 9  # BDRV_SECTOR_BITS
SECTOR_SIZE = 1 << SECTOR_BITS  # BDRV_SECTOR_SIZE
CHUNK_SIZE = 1 << 20  # BLK_MIG_BLOCK_SIZE; BDRV_SECTORS_PER_DIRTY_CHUNK = 2048 sectors

FLAG_DEVICE_BLOCK = 0x01  # BLK_MIG_FLAG_DEVICE_BLOCK: a chunk of a device follows
FLAG_EOS = 0x02  # BLK_MIG_FLAG_EOS: end of this section body
FLAG_PROGRESS = 0x04  # BLK_MIG_FLAG_PROGRESS: the sector field holds a percentage
FLAG_ZERO_BLOCK = 0x08  # BLK_MIG_FLAG_ZERO_BLOCK: the chunk is all zeros, no payload follows
KNOWN_FLAGS = FLAG_DEVICE_BLOCK | FLAG_EOS | FLAG_PROGRESS | FLAG_ZERO_BLOCK
FLAGS_FIELD = SECTOR_SIZE - 1  # block_load(): flags = addr & (BDRV_SECTOR_SIZE - 1)

MAX_NAME_LEN = 255  # blk_send() writes strlen(name) as one byte (qemu_put_byte)
# Byte offsets must stay representable as a signed 64-bit file offset (off_t) on the receiver.
MAX_BYTE_OFFSET = (1 << 63) - 1

RECORD_WORD = struct.Struct(">Q")
EOS_RECORD = RECORD_WORD.pack(FLAG_EOS)

# ---------------------------------------------------------------------------------------------
# The envelope (migration/savevm.h, migration/savevm.c)
# ---------------------------------------------------------------------------------------------

QEMU_VM_FILE_MAGIC = 0x5145564D  # b"QEVM"
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002  # refused by QEMU itself ("SaveVM v2 format is obsolete")
QEMU_VM_FILE_VERSION = 0x00000003
MAGIC_BYTES = struct.pack(">I", QEMU_VM_FILE_MAGIC)

QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01  # u8 type, be32 section id, u8 idstr len, idstr, be32 instance id, be32 version id
QEMU_VM_SECTION_PART = 0x02  # u8 type, be32 section id
QEMU_VM_SECTION_END = 0x03  # u8 type, be32 section id
QEMU_VM_SECTION_FULL = 0x04  # as START
QEMU_VM_SUBSECTION = 0x05  # inside a vmstate: u8 type, u8 name len, name, be32 version id, fields
QEMU_VM_VMDESCRIPTION = 0x06  # after EOF: u8 type, be32 length, JSON text
QEMU_VM_CONFIGURATION = 0x07  # right after the header: u8 type, then vmstate "configuration"
QEMU_VM_COMMAND = 0x08  # postcopy/return-path commands; never in a precopy exec: stream
QEMU_VM_SECTION_FOOTER = 0x7E  # save_section_footer(): u8 0x7e, be32 section id

SECTION_TYPE_NAMES = {
    QEMU_VM_EOF: "EOF",
    QEMU_VM_SECTION_START: "START",
    QEMU_VM_SECTION_PART: "PART",
    QEMU_VM_SECTION_END: "END",
    QEMU_VM_SECTION_FULL: "FULL",
    QEMU_VM_SUBSECTION: "SUBSECTION",
    QEMU_VM_VMDESCRIPTION: "VMDESCRIPTION",
    QEMU_VM_CONFIGURATION: "CONFIGURATION",
    QEMU_VM_COMMAND: "COMMAND",
    QEMU_VM_SECTION_FOOTER: "FOOTER",
}

BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")

# Sections QEMU 7.2 writes for `-M none` with the `block` capability, and nothing else. Section ids
# are registration order in that binary (timer 0, block 1, ram 2, globalstate 4; id 3 is a
# registered entry that saves nothing). QEMU's loader matches START/FULL sections by idstr and
# instance id, and PART/END sections by the id the START announced, so the ids themselves are free.
BLOCK_SECTION = "block"  # block.c: register_savevm_live("block", 0, 1, ...)
BLOCK_SECTION_VERSION = 1
BLOCK_SECTION_ID = 1
RAM_SECTION = "ram"  # ram.c: register_savevm_live("ram", 0, 4, ...)
RAM_SECTION_VERSION = 4
RAM_SECTION_ID = 2
TIMER_SECTION = "timer"  # cpu-timers.c: vmstate_timers, version_id 2
TIMER_SECTION_VERSION = 2
TIMER_SECTION_ID = 0
GLOBALSTATE_SECTION = "globalstate"  # global_state.c: vmstate_globalstate, version_id 1
GLOBALSTATE_SECTION_VERSION = 1
GLOBALSTATE_SECTION_ID = 4

# Iterative (START/PART/END) and full (FULL) sections this package understands, with their versions.
ITERATIVE_SECTIONS = {BLOCK_SECTION: BLOCK_SECTION_VERSION, RAM_SECTION: RAM_SECTION_VERSION}
FULL_SECTIONS = {TIMER_SECTION: TIMER_SECTION_VERSION, GLOBALSTATE_SECTION: GLOBALSTATE_SECTION_VERSION}

# ram.c flags live in the low bits of a be64 whose high bits are a byte address or length.
RAM_SAVE_FLAG_MEM_SIZE = 0x04  # ram_save_setup(): be64 total RAM bytes | MEM_SIZE, then per-block entries
RAM_SAVE_FLAG_EOS = 0x10  # end of a ram section body
RAM_MEM_SIZE_NONE = BE64.pack(RAM_SAVE_FLAG_MEM_SIZE)  # `-M none` has no RAM: total 0, no block entries
RAM_EOS = BE64.pack(RAM_SAVE_FLAG_EOS)

# vmstate "timer" (cpu-timers.c): int64 cpu_ticks_offset, 8 unused bytes (VMSTATE_UNUSED(8)),
# int64 cpu_clock_offset; subsection "timer/icount" only with -icount.
TIMER_BODY_LEN = 24

# vmstate "globalstate" (global_state.c, 7.2): uint32 size (strlen(runstate) + 1), then the
# 100-byte runstate buffer (VMSTATE_BUFFER(runstate)), NUL padded.
GLOBALSTATE_RUNSTATE_LEN = 100
GLOBALSTATE_BODY_LEN = 4 + GLOBALSTATE_RUNSTATE_LEN

# vmstate "configuration" (savevm.c): uint32 len, then len bytes of machine name (no NUL); then
# optional subsections. QEMU 7.2 on x86 writes none of them by default.
CONFIG_SUBSECTION_TARGET_PAGE_BITS = "configuration/target-page-bits"  # be32 target_page_bits
CONFIG_SUBSECTION_CAPABILITIES = "configuration/capabilities"  # be32 count, count x (u8 len, name)
CONFIG_SUBSECTION_UUID = "configuration/uuid"  # 16 bytes
MAX_MACHINE_NAME_LEN = 255
MAX_CAPABILITIES = 64

# The JSON description after EOF; `-M none` writes a few hundred bytes. A bound keeps a corrupt
# length from making us buffer gigabytes.
MAX_VMDESC_LEN = 1 << 20


def section_header(section_type: int, section_id: int, name: str | None = None, instance_id: int = 0,
                   version_id: int = 0) -> bytes:
    """Encode a section header as savevm.c save_section_header() does (idstr only for START/FULL)."""
    head = bytes([section_type]) + BE32.pack(section_id)
    if section_type in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
        idstr = name.encode("ascii")
        head += bytes([len(idstr)]) + idstr + BE32.pack(instance_id) + BE32.pack(version_id)
    return head


def section_footer(section_id: int) -> bytes:
    """savevm.c save_section_footer(): 0x7e, be32 section id."""
    return bytes([QEMU_VM_SECTION_FOOTER]) + BE32.pack(section_id)


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One record of the block section."""

    kind: str  # "block", "progress" or "eos"
    offset: int  # stream byte offset where the record's header starts
    device: str | None = None  # block records
    sector: int = 0  # block records: first 512-byte sector
    zero: bool = False  # block record with ZERO_BLOCK: no payload follows
    percent: int = 0  # progress records


@dataclass(frozen=True)
class Section:
    """One element of the QEMU envelope, as seen by a reader asked to trace them (for tests/tools)."""

    kind: str  # "CONFIGURATION", "START", "PART", "END", "FULL", "EOF" or "VMDESCRIPTION"
    offset: int  # stream byte offset of the element's type byte
    section_id: int | None = None
    name: str | None = None  # idstr (START/FULL/PART/END) or machine name (config)
    instance_id: int | None = None  # START/FULL
    version_id: int | None = None  # START/FULL
    body: bytes | None = None  # raw body of CONFIGURATION, FULL sections and the JSON description


def chunk_sectors(chunk_size: int) -> int:
    """Sectors per chunk; the chunk size must be a positive multiple of SECTOR_SIZE."""
    if chunk_size <= 0 or chunk_size % SECTOR_SIZE:
        raise ValueError(f"chunk size {chunk_size} is not a positive multiple of {SECTOR_SIZE}")
    return chunk_size // SECTOR_SIZE


def classify_word(word: int, offset: int, chunk_size: int = CHUNK_SIZE) -> tuple[str, int, bool]:
    """Validate the be64 word that starts a record; return (kind, sector or percent, zero).

    Accepts exactly what QEMU 7.2 writes (block.c blk_send, blk_mig_save_bulked_block,
    block_save_complete) and raises StreamError for anything else, including what QEMU's own
    loader would tolerate (unknown high flag bits combined with EOS, a block record that also
    carries EOS, unaligned sectors).
    """
    flags = word & FLAGS_FIELD
    value = word >> SECTOR_BITS
    if flags & ~KNOWN_FLAGS:
        raise StreamError(f"record has unknown flag bits {flags & ~KNOWN_FLAGS:#x} (flags {flags:#x})", offset)
    if flags & FLAG_DEVICE_BLOCK:
        if flags & (FLAG_PROGRESS | FLAG_EOS):
            raise StreamError(f"block record also flagged as progress/end of section (flags {flags:#x})", offset)
        if value % chunk_sectors(chunk_size):
            raise StreamError(f"block record sector {value} is not on a {chunk_size}-byte chunk boundary", offset)
        if value * SECTOR_SIZE > MAX_BYTE_OFFSET - chunk_size:
            raise StreamError(f"block record sector {value} is beyond any device", offset)
        return "block", value, bool(flags & FLAG_ZERO_BLOCK)
    if flags & FLAG_ZERO_BLOCK:
        raise StreamError(f"ZERO_BLOCK flag without DEVICE_BLOCK (flags {flags:#x})", offset)
    if flags == FLAG_PROGRESS:
        if value > 100:
            raise StreamError(f"progress record of {value} %", offset)
        return "progress", value, False
    if flags == FLAG_EOS:
        if value:
            raise StreamError(f"end-of-section record with a non-zero sector field {value}", offset)
        return "eos", 0, False
    if flags == 0:
        raise StreamError("record without flags", offset)
    raise StreamError(f"record flagged both progress and end of section (flags {flags:#x})", offset)


def decode_device_name(raw: bytes, offset: int) -> str:
    """Device names are 1..255 bytes of UTF-8 without NUL (QEMU's names are C strings)."""
    if not raw:
        raise StreamError("block record with an empty device name", offset)
    if b"\0" in raw:
        raise StreamError(f"device name {raw!r} contains a NUL byte", offset)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StreamError(f"device name {raw!r} is not UTF-8", offset) from None


def encode_device_name(device: str | bytes) -> bytes:
    """The u8 length and the name bytes; raises ValueError for names QEMU's format cannot carry."""
    raw = device.encode("utf-8") if isinstance(device, str) else bytes(device)
    if not 1 <= len(raw) <= MAX_NAME_LEN:
        raise ValueError(f"device name must be 1..{MAX_NAME_LEN} bytes of UTF-8, got {len(raw)} bytes")
    if b"\0" in raw:
        raise ValueError("device name must not contain NUL")
    raw.decode("utf-8")  # bytes given by a caller must be UTF-8 too
    return bytes([len(raw)]) + raw


def encode_block_header(sector: int, flags: int, name: str | bytes | None = None) -> bytes:
    """Encode a record header: be64 (sector << 9 | flags), plus the name when DEVICE_BLOCK is set.

    Only representability is checked (sector < 2**55, flags < 512, name length 1..255), so fuzzers
    can build headers the decoder must refuse. ``StreamWriter`` adds the semantic checks.
    """
    if not 0 <= sector < 1 << (64 - SECTOR_BITS):
        raise ValueError(f"sector {sector} does not fit in 55 bits")
    if not 0 <= flags <= FLAGS_FIELD:
        raise ValueError(f"flags {flags:#x} do not fit in 9 bits")
    head = RECORD_WORD.pack((sector << SECTOR_BITS) | flags)
    if flags & FLAG_DEVICE_BLOCK:
        if name is None:
            raise ValueError("a DEVICE_BLOCK header needs a device name")
        head += encode_device_name(name)
    return head


def encode_progress(percent: int) -> bytes:
    if not 0 <= percent <= 100:
        raise ValueError(f"progress {percent} is not a percentage")
    return RECORD_WORD.pack((percent << SECTOR_BITS) | FLAG_PROGRESS)


def decode_block_header(data: bytes | bytearray | memoryview, offset: int = 0, *,
                        chunk_size: int = CHUNK_SIZE) -> tuple[Record, int]:
    """Decode one record header from the start of ``data``; return (record, header length).

    ``offset`` is the stream offset of ``data[0]`` (used in the record and in errors). The payload
    (chunk_size bytes for a non-zero block record) is not part of the header. Raises
    StreamTruncated when ``data`` ends inside the header and StreamError when it is malformed.
    """
    data = bytes(data[: RECORD_WORD.size + 1 + MAX_NAME_LEN])
    if len(data) < RECORD_WORD.size:
        raise StreamTruncated(f"stream ended inside a record header ({len(data)} of 8 bytes)", offset)
    (word,) = RECORD_WORD.unpack_from(data)
    kind, value, zero = classify_word(word, offset, chunk_size)
    if kind == "progress":
        return Record("progress", offset, percent=value), RECORD_WORD.size
    if kind == "eos":
        return Record("eos", offset), RECORD_WORD.size
    if len(data) < RECORD_WORD.size + 1:
        raise StreamTruncated("stream ended before the device name length", offset)
    length = data[RECORD_WORD.size]
    end = RECORD_WORD.size + 1 + length
    if length == 0:
        raise StreamError("block record with an empty device name", offset)
    if len(data) < end:
        raise StreamTruncated(f"stream ended inside a device name ({len(data) - 9} of {length} bytes)", offset)
    device = decode_device_name(data[RECORD_WORD.size + 1:end], offset)
    return Record("block", offset, device=device, sector=value, zero=zero), end
