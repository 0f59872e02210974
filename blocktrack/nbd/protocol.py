"""Every NBD constant and byte layout blocktrack speaks, in one place.

Source: the protocol specification, ``doc/proto.md`` of https://github.com/NetworkBlockDevice/nbd
(read at commit 89ba7b5), and QEMU's ``docs/interop/nbd.txt`` for the ``qemu:`` namespace. Names
follow the specification (and nbdkit's ``common/protocol/nbd-protocol.h``) so that grepping the spec
for a name here finds its definition.

Byte order: every integer on the wire is unsigned and big-endian (network order); the structs
below all start with ``>``. Strings are UTF-8, never NUL-terminated, their length carried by a
length field sent earlier in the same message, and at most 4096 bytes.

The protocol has two phases.

Handshake (fixed newstyle)::

    S: NBDMAGIC (u64) IHAVEOPT (u64) handshake flags (u16)        HELLO
    C: client flags (u32)
    then repeatedly:
    C: IHAVEOPT (u64) option (u32) length (u32) data[length]       OPTION_HEADER
    S: REPLY_MAGIC (u64) option (u32) reply type (u32) length (u32) data[length]   OPTION_REPLY_HEADER
    until the client sends NBD_OPT_EXPORT_NAME (answered by EXPORT_NAME_REPLY, no reply header)
    or the server answers NBD_OPT_GO with NBD_REP_ACK.

Transmission::

    C: REQUEST_MAGIC (u32) command flags (u16) type (u16) cookie (u64) offset (u64) length (u32)
       [length bytes of data for NBD_CMD_WRITE]                    REQUEST
    S: SIMPLE_REPLY_MAGIC (u32) error (u32) cookie (u64) [data for a successful READ]   SIMPLE_REPLY
    or, once NBD_OPT_STRUCTURED_REPLY was acknowledged, one or more chunks:
    S: STRUCTURED_REPLY_MAGIC (u32) flags (u16) type (u16) cookie (u64) length (u32) payload
                                                                   STRUCTURED_REPLY

The cookie ("handle" in older texts) is opaque: the server copies it into every reply to that
request, which is what lets replies go out in any order.
"""

from __future__ import annotations

import errno
import struct

# -- magic numbers -------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC", first 8 bytes from the server (INIT_PASSWD)
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT": newstyle server magic, and every option's magic
CLISERV_MAGIC = 0x00420281861253         # oldstyle: second 8 bytes from the server
OPTION_REPLY_MAGIC = 0x3E889045565A9     # every option reply in fixed newstyle
REQUEST_MAGIC = 0x25609513               # every transmission request
SIMPLE_REPLY_MAGIC = 0x67446698          # simple reply (formerly NBD_REPLY_MAGIC)
STRUCTURED_REPLY_MAGIC = 0x668E33EF      # structured reply chunk
# Reserved by the spec for the experimental extended headers; we do not negotiate them, and a
# request carrying this magic is rejected like any other bad magic.
EXTENDED_REQUEST_MAGIC = 0x21E41C71

# -- handshake flags (u16, server → client, after IHAVEOPT) ---------------------------------------

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0         # server speaks fixed newstyle
NBD_FLAG_NO_ZEROES = 1 << 1              # server can omit the 124 zero bytes after EXPORT_NAME

# -- client flags (u32, client → server); any other bit set means: drop the connection ------------

NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# -- transmission flags (u16, in NBD_INFO_EXPORT / the EXPORT_NAME reply) --------------------------

NBD_FLAG_HAS_FLAGS = 1 << 0              # always set
NBD_FLAG_READ_ONLY = 1 << 1              # writes, trims and zeroes will fail with NBD_EPERM
NBD_FLAG_SEND_FLUSH = 1 << 2             # NBD_CMD_FLUSH understood
NBD_FLAG_SEND_FUA = 1 << 3               # NBD_CMD_FLAG_FUA understood
NBD_FLAG_ROTATIONAL = 1 << 4             # a hint for the client's I/O scheduler
NBD_FLAG_SEND_TRIM = 1 << 5              # NBD_CMD_TRIM understood
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6      # NBD_CMD_WRITE_ZEROES and NBD_CMD_FLAG_NO_HOLE understood
NBD_FLAG_SEND_DF = 1 << 7                # NBD_CMD_FLAG_DF on reads (only with structured replies)
NBD_FLAG_CAN_MULTI_CONN = 1 << 8         # flush/FUA on one connection covers writes on all
NBD_FLAG_SEND_RESIZE = 1 << 9            # experimental RESIZE extension (not offered)
NBD_FLAG_SEND_CACHE = 1 << 10            # NBD_CMD_CACHE understood
NBD_FLAG_SEND_FAST_ZERO = 1 << 11        # NBD_CMD_FLAG_FAST_ZERO understood

# -- options (u32, client → server) --------------------------------------------------------------

NBD_OPT_EXPORT_NAME = 1                  # data: export name; no reply header; enters transmission
NBD_OPT_ABORT = 2                        # end the session; server replies NBD_REP_ACK
NBD_OPT_LIST = 3                         # no data; NBD_REP_SERVER per export, then NBD_REP_ACK
NBD_OPT_PEEK_EXPORT = 4                  # withdrawn
NBD_OPT_STARTTLS = 5                     # we run in NOTLS mode: answered NBD_REP_ERR_POLICY
NBD_OPT_INFO = 6                         # data: INFO_REQUEST; NBD_REP_INFO..., NBD_REP_ACK
NBD_OPT_GO = 7                           # as INFO, and NBD_REP_ACK enters transmission
NBD_OPT_STRUCTURED_REPLY = 8             # no data; NBD_REP_ACK turns on structured replies
NBD_OPT_LIST_META_CONTEXT = 9            # data: META_CONTEXT_REQUEST; NBD_REP_META_CONTEXT..., ACK
NBD_OPT_SET_META_CONTEXT = 10            # same data; selects the contexts for BLOCK_STATUS
NBD_OPT_EXTENDED_HEADERS = 11            # experimental; answered NBD_REP_ERR_UNSUP

OPTION_NAMES = {
    NBD_OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME", NBD_OPT_ABORT: "NBD_OPT_ABORT", NBD_OPT_LIST: "NBD_OPT_LIST",
    NBD_OPT_PEEK_EXPORT: "NBD_OPT_PEEK_EXPORT", NBD_OPT_STARTTLS: "NBD_OPT_STARTTLS",
    NBD_OPT_INFO: "NBD_OPT_INFO", NBD_OPT_GO: "NBD_OPT_GO", NBD_OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    NBD_OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT", NBD_OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
    NBD_OPT_EXTENDED_HEADERS: "NBD_OPT_EXTENDED_HEADERS",
}

# -- option reply types (u32, server → client); errors have bit 31 set and may carry a message -----

NBD_REP_ACK = 1                          # done, no data
NBD_REP_SERVER = 2                       # data: u32 name length, name, [description]
NBD_REP_INFO = 3                         # data: u16 info type, payload (see NBD_INFO_*)
NBD_REP_META_CONTEXT = 4                 # data: u32 context id, name
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1         # option unknown to this server
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2        # known, but forbidden by policy
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3       # syntactically or semantically invalid
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4      # not available on this platform/build
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5      # TLS first (never sent by a NOTLS server)
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6       # no such export
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7      # the server is shutting down
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9       # request or reply too large

# -- NBD_REP_INFO types (u16) ---------------------------------------------------------------------

NBD_INFO_EXPORT = 0                      # u64 size, u16 transmission flags (INFO_EXPORT)
NBD_INFO_NAME = 1                        # canonical export name
NBD_INFO_DESCRIPTION = 2                 # human-readable description
NBD_INFO_BLOCK_SIZE = 3                  # u32 minimum, u32 preferred, u32 maximum payload

# -- commands (u16 request type) ------------------------------------------------------------------

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1                        # the only request followed by data
NBD_CMD_DISC = 2                         # no reply; finish what is in flight, then close
NBD_CMD_FLUSH = 3                        # offset and length reserved (zero)
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

COMMAND_NAMES = {
    NBD_CMD_READ: "READ", NBD_CMD_WRITE: "WRITE", NBD_CMD_DISC: "DISC", NBD_CMD_FLUSH: "FLUSH",
    NBD_CMD_TRIM: "TRIM", NBD_CMD_CACHE: "CACHE", NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

# -- command flags (u16) and the commands each is valid for ---------------------------------------

NBD_CMD_FLAG_FUA = 1 << 0                # persist before replying (any command; meaningful for writes)
NBD_CMD_FLAG_NO_HOLE = 1 << 1            # WRITE_ZEROES: keep the range allocated
NBD_CMD_FLAG_DF = 1 << 2                 # READ: at most one data chunk (structured replies only)
NBD_CMD_FLAG_REQ_ONE = 1 << 3            # BLOCK_STATUS: one extent per context
NBD_CMD_FLAG_FAST_ZERO = 1 << 4          # WRITE_ZEROES: fail with NBD_ENOTSUP unless it is fast

# FUA is valid on every command (clients are known to set it on reads); the others only here.
VALID_COMMAND_FLAGS = {
    NBD_CMD_READ: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
    NBD_CMD_WRITE: NBD_CMD_FLAG_FUA,
    NBD_CMD_DISC: NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH: NBD_CMD_FLAG_FUA,
    NBD_CMD_TRIM: NBD_CMD_FLAG_FUA,
    NBD_CMD_CACHE: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_BLOCK_STATUS: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
}

# -- structured reply flags and chunk types -------------------------------------------------------

NBD_REPLY_FLAG_DONE = 1 << 0             # the last chunk of this reply
NBD_REPLY_TYPE_NONE = 0                  # no payload; only as the final chunk
NBD_REPLY_TYPE_OFFSET_DATA = 1           # u64 offset, data
NBD_REPLY_TYPE_OFFSET_HOLE = 2           # u64 offset, u32 length: reads as zeroes
NBD_REPLY_TYPE_BLOCK_STATUS = 5          # u32 context id, then (u32 length, u32 flags) descriptors
NBD_REPLY_TYPE_ERROR = (1 << 15) | 1     # u32 error, u16 message length, message
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2  # as ERROR, then u64 offset

# -- block status flags ---------------------------------------------------------------------------

NBD_STATE_HOLE = 1 << 0                  # base:allocation: not allocated
NBD_STATE_ZERO = 1 << 1                  # base:allocation: reads as zeroes
NBD_STATE_DIRTY = 1 << 0                 # qemu:dirty-bitmap:NAME: changed (QEMU's docs/interop/nbd.txt)

# -- error values (u32, in replies) ---------------------------------------------------------------
# The spec fixes these numbers (they equal Linux errno values); any other errno is reported as EIO.

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

_ERRNO_TO_NBD = {
    errno.EPERM: NBD_EPERM, errno.EACCES: NBD_EPERM, errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC, errno.EFBIG: NBD_ENOSPC,  # as the spec asks
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP, errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_error(err: int) -> int:
    """The NBD error value for a local errno (NBD_EIO for anything the spec does not name)."""
    return _ERRNO_TO_NBD.get(err, NBD_EIO)


# -- sizes ----------------------------------------------------------------------------------------

MAX_STRING = 4096                        # the longest name or message a peer may send
MAX_OPTION_LENGTH = 64 * 1024            # option data we read; longer: NBD_REP_ERR_TOO_BIG
MAX_PAYLOAD = 32 << 20                   # largest READ/WRITE we accept (the spec's 2^25 default)
DEFAULT_PREFERRED_BLOCK = 4096           # NBD_INFO_BLOCK_SIZE preferred size
MAX_EXTENT_LENGTH = 0xFFFFFFFF           # a block status descriptor's length is a u32
MAX_EXTENTS = 1 << 16                    # descriptors per block status chunk (spec: SHOULD NOT > 2^20)
OLDSTYLE_ZEROES = 124                    # reserved bytes after the oldstyle header and EXPORT_NAME reply

# -- byte layouts (all big-endian) ----------------------------------------------------------------

# S: NBDMAGIC, IHAVEOPT, u16 handshake flags
HELLO = struct.Struct(">QQH")
# S (oldstyle): NBDMAGIC, CLISERV_MAGIC, u64 export size, u32 flags (u16 transmission flags in the
# low half), then OLDSTYLE_ZEROES zero bytes
OLDSTYLE_HELLO = struct.Struct(">QQQI")
# C: u32 client flags
CLIENT_FLAGS = struct.Struct(">I")
# C: IHAVEOPT, u32 option, u32 data length
OPTION_HEADER = struct.Struct(">QII")
# S: OPTION_REPLY_MAGIC, u32 option, u32 reply type, u32 data length
OPTION_REPLY_HEADER = struct.Struct(">QIII")
# S (after NBD_OPT_EXPORT_NAME): u64 export size, u16 transmission flags [, 124 zero bytes]
EXPORT_NAME_REPLY = struct.Struct(">QH")
# NBD_REP_INFO payload for NBD_INFO_EXPORT: u16 type, u64 size, u16 transmission flags
INFO_EXPORT = struct.Struct(">HQH")
# NBD_REP_INFO payload for NBD_INFO_BLOCK_SIZE: u16 type, u32 minimum, u32 preferred, u32 maximum
INFO_BLOCK_SIZE = struct.Struct(">HIII")
# NBD_REP_INFO type prefix before a string (NBD_INFO_NAME, NBD_INFO_DESCRIPTION)
INFO_TYPE = struct.Struct(">H")
# u32 length prefix of a string (export names in options and NBD_REP_SERVER, queries)
U32 = struct.Struct(">I")
# u16 count (number of NBD_INFO requests in INFO/GO data) and each request
U16 = struct.Struct(">H")
# NBD_REP_META_CONTEXT payload prefix: u32 context id, then the name
META_CONTEXT_ID = struct.Struct(">I")

# C: REQUEST_MAGIC, u16 command flags, u16 type, u64 cookie, u64 offset, u32 length (28 bytes)
REQUEST = struct.Struct(">IHHQQI")
# S: SIMPLE_REPLY_MAGIC, u32 error, u64 cookie (16 bytes)
SIMPLE_REPLY = struct.Struct(">IIQ")
# S: STRUCTURED_REPLY_MAGIC, u16 flags, u16 type, u64 cookie, u32 payload length (20 bytes)
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# Structured header followed by the u64 offset of an NBD_REPLY_TYPE_OFFSET_DATA chunk (28 bytes)
STRUCTURED_OFFSET_DATA = struct.Struct(">IHHQIQ")
# Payload of NBD_REPLY_TYPE_OFFSET_HOLE: u64 offset, u32 length
OFFSET_HOLE = struct.Struct(">QI")
# Payload start of NBD_REPLY_TYPE_ERROR(_OFFSET): u32 error, u16 message length
ERROR_PAYLOAD = struct.Struct(">IH")
# Tail of NBD_REPLY_TYPE_ERROR_OFFSET: u64 offset
U64 = struct.Struct(">Q")
# One block status descriptor: u32 length, u32 flags
BLOCK_DESCRIPTOR = struct.Struct(">II")


def option_name(option: int) -> str:
    return OPTION_NAMES.get(option, f"option {option}")


def command_name(command: int) -> str:
    return COMMAND_NAMES.get(command, f"command {command}")
