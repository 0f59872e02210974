"""Byte layouts of blocktrack's live-migration control protocol, around the block-migration stream.

``blocktrack migrate`` talks to ``blocktrack receive`` over one connection (TCP, TLS, or the pipes
of an ssh process: blocktrack.secure). The QEMU stream (layout.py) is its payload; this module holds
everything else on that connection (and the pre-shared-key exchange that may precede it), and the JSON
lines of the local control socket that ``blocktrack release`` uses. Pure codecs, no I/O: callers
read exactly the lengths these headers announce. All integers are big-endian.

Connection, in order::

    sender → receiver   HELLO                      once, the first bytes of the connection
    receiver → sender   KEEPALIVE ... ACCEPT | REFUSE   before any data moves (keep-alives while a
                                               resuming receiver reads back what it holds)
    sender → receiver   DATA frames ... END        the migration stream, cut into frames
    receiver → sender   ACK ...                    while the stream arrives
    receiver → sender   RESULT | ERROR             after END: the digests, or why it failed
    sender → receiver   VERDICT                    the sender's comparison with the frozen source

HELLO (45 + N bytes). The receiver tells a migration from a plain stream by these 8 bytes: "QEVM"
starts a QEMU stream, and a bare stream starts with a be64 record word whose low 9 bits are flags;
our last byte 0xff sets flag bits 0xf0, which no record may carry, so no valid bare stream starts
with HELLO_MAGIC::

    0   8  magic          b"BTMIGRT\\xff"
    8   2  version        4 (3 had no MARK frames; 2 sent digests of the final part only; 1 had no
                          keep-alives)
    10  2  flags          0x1 RESUME (continue migration <id>), 0x2 VERIFY_FULL (digest every chunk)
    12  16 migration id   random, chosen by the sender when the migration starts, kept on resume
    28  8  device size    bytes of the source device
    36  4  chunk size     bytes (1 MiB, the wire format's)
    40  4  attempt        1 for the first connection, +1 for every resume (for logs)
    44  1  N              device name length, 1..255
    45  N  device name    UTF-8, no NUL: the name the stream's block records carry

Sender frames (5-byte header, then the payload)::

    0   1  type           1 DATA, 2 END, 3 VERDICT, 4 KEEPALIVE, 5 MARK
    1   4  length         payload bytes: DATA 1..MAX_DATA_FRAME, END 0, VERDICT 1..4097, KEEPALIVE 0,
                          MARK 8
    DATA                  the next bytes of the migration stream
    END                   the stream is complete: the receiver's stream reader sees its end here
    VERDICT               u8 result (0 VERIFIED, 1 MISMATCH, 2 FAILED), then a UTF-8 message
    MARK                  be64: how many stream bytes the sender has sent in DATA frames so far. Sent
                          before END and whenever the sender starts waiting for the receiver to catch
                          up; the receiver checks it received exactly that many, so a stream cut or
                          spliced on the way (a middlebox, no TLS) fails at once, not by a stall
    KEEPALIVE             nothing: sent when the sender has sent nothing for a third of its stall
                          timeout, so the receiver can tell an idle sender from a stalled one

Framing is what lets the sender say "end of stream" and still talk afterwards: the stream reader
needs an end of input, and a half-closed socket could not carry the verdict.

Receiver messages (9-byte header, then the payload)::

    0   4  magic          b"BTRV"
    4   1  type           1 ACCEPT, 2 REFUSE, 3 ACK, 4 RESULT, 5 ERROR, 6 KEEPALIVE (no payload; as the
                          sender's, while the receiver is busy: reading back the chunks it holds
                          before ACCEPT on a resume, flushing, digesting the target)
    5   4  length         payload bytes
    ACCEPT  be64 target size, be64 nchunks, be64 chunks held, then ceil(nchunks / 8) bytes: bit i
            (byte i >> 3, bit i & 7) set when chunk i of this migration is on the target's stable
            storage from earlier connections (all clear for a new migration)
    REFUSE  be16 reason (REFUSE_* below), UTF-8 message
    ACK     be64 received: stream bytes parsed and handed to the target's writer;
            be64 durable: stream bytes whose writes are flushed and synced (resume starts from here)
    RESULT  u8 algorithm (1 XXH3_128), u8 scope (2 FULL, 3 MAP), be64 chunks written on this
            connection, be64 chunks held in all (this migration), be64 nchunks, then nchunks x 16
            bytes: the digest of chunk i at 16 * i, for every chunk of the device (16 zero bytes
            for a chunk the receiver has no digest of, which never matches)
    ERROR   UTF-8 message: the receiver failed (it closes the connection after this)

Digests cover a chunk's bytes inside the device (the last chunk may be short); XXH3_128's 16 bytes
are its canonical (big-endian) form. Scope MAP (the default): the receiver's digest map, each
chunk's digest taken from the buffer it wrote on this connection, or for a chunk it held from an
earlier connection, read back from the target when this connection began (never from a saved
file); the sender compares it with the digests of the chunks as it read and sent them. Scope FULL
(VERIFY_FULL): every chunk read back from the target after the final flush, compared with the
frozen source read again.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from blocktrack.errors import StreamError

VERSION = 4  # 4: MARK frames; 3: RESULT carries the whole digest map; 2: keep-alive frames and messages
HELLO_MAGIC = b"BTMIGRT\xff"
HELLO = struct.Struct(">8sHH16sQIIB")
FLAG_RESUME = 0x1
FLAG_VERIFY_FULL = 0x2
KNOWN_HELLO_FLAGS = FLAG_RESUME | FLAG_VERIFY_FULL
MIGRATION_ID_LEN = 16
MAX_NAME_LEN = 255

FRAME = struct.Struct(">BI")
FRAME_DATA, FRAME_END, FRAME_VERDICT, FRAME_KEEPALIVE, FRAME_MARK = 1, 2, 3, 4, 5
MARK = struct.Struct(">Q")
MAX_DATA_FRAME = 16 << 20
MAX_MESSAGE = 4096
VERDICT_VERIFIED, VERDICT_MISMATCH, VERDICT_FAILED = 0, 1, 2
VERDICT_NAMES = {VERDICT_VERIFIED: "verified", VERDICT_MISMATCH: "mismatch", VERDICT_FAILED: "failed"}

REPLY_MAGIC = b"BTRV"
REPLY = struct.Struct(">4sBI")
ACCEPT, REFUSE, ACK, RESULT, ERROR, KEEPALIVE = 1, 2, 3, 4, 5, 6
REPLY_NAMES = {ACCEPT: "ACCEPT", REFUSE: "REFUSE", ACK: "ACK", RESULT: "RESULT", ERROR: "ERROR",
               KEEPALIVE: "KEEPALIVE"}

ACCEPT_HEAD = struct.Struct(">QQQ")
REFUSE_HEAD = struct.Struct(">H")
ACK_BODY = struct.Struct(">QQ")
RESULT_HEAD = struct.Struct(">BBQQQ")
DIGEST_SIZE = 16

REFUSE_VERSION = 1       # a protocol version or flag this receiver does not speak
REFUSE_DEVICE = 2        # the device name is not mapped on the receiver's command line
REFUSE_SIZE = 3          # the target is smaller than the device
REFUSE_MIGRATION = 4     # a resume of a migration this target is not part of
REFUSE_TARGET = 5        # the target cannot be opened or used
REFUSE_NAMES = {REFUSE_VERSION: "version", REFUSE_DEVICE: "device", REFUSE_SIZE: "size",
                REFUSE_MIGRATION: "migration id", REFUSE_TARGET: "target"}

DIGEST_XXH3_128 = 1
SCOPE_FULL, SCOPE_MAP = 2, 3   # 1 (version 2's FINAL_PART) is retired
SCOPE_NAMES = {SCOPE_FULL: "full", SCOPE_MAP: "digest-map"}


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StreamError(f"{what} is not UTF-8") from None


def _message(text: str) -> bytes:
    raw = text.encode("utf-8", "replace")
    if len(raw) > MAX_MESSAGE:
        raw = raw[:MAX_MESSAGE - 3] + b"..."
    return raw


# -- HELLO -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    migration_id: bytes
    device: str
    size: int
    chunk_size: int
    flags: int = 0
    attempt: int = 1
    version: int = VERSION

    @property
    def resume(self) -> bool:
        return bool(self.flags & FLAG_RESUME)

    @property
    def verify_full(self) -> bool:
        return bool(self.flags & FLAG_VERIFY_FULL)

    @property
    def nchunks(self) -> int:
        return -(-self.size // self.chunk_size)


def encode_hello(hello: Hello) -> bytes:
    name = hello.device.encode("utf-8")
    if not 1 <= len(name) <= MAX_NAME_LEN or b"\0" in name:
        raise ValueError(f"device name must be 1..{MAX_NAME_LEN} bytes of UTF-8 without NUL")
    if len(hello.migration_id) != MIGRATION_ID_LEN:
        raise ValueError("a migration id is 16 bytes")
    return HELLO.pack(HELLO_MAGIC, hello.version, hello.flags, hello.migration_id, hello.size,
                      hello.chunk_size, hello.attempt, len(name)) + name


def decode_hello_head(head: bytes) -> tuple[Hello, int]:
    """Decode the fixed HELLO.size bytes; return the Hello (device still empty) and the name length.

    Raises StreamError for a bad magic, version, flags or geometry: the receiver answers REFUSE
    (version) or gives up before anything else is read."""
    magic, version, flags, mid, size, chunk_size, attempt, name_len = HELLO.unpack(head)
    if magic != HELLO_MAGIC:
        raise StreamError(f"not a blocktrack migration (magic {magic!r})", 0)
    if name_len == 0:
        raise StreamError("migration handshake with an empty device name", 0)
    if chunk_size <= 0 or chunk_size % 512:
        raise StreamError(f"migration handshake with chunk size {chunk_size}", 0)
    return Hello(mid, "", size, chunk_size, flags, attempt, version), name_len


def decode_hello_name(hello: Hello, raw: bytes) -> Hello:
    if b"\0" in raw:
        raise StreamError(f"device name {raw!r} contains a NUL byte", 0)
    return Hello(hello.migration_id, _text(raw, "the device name"), hello.size, hello.chunk_size,
                 hello.flags, hello.attempt, hello.version)


# -- sender frames -----------------------------------------------------------------------------------


def frame_header(kind: int, length: int) -> bytes:
    return FRAME.pack(kind, length)


def decode_frame_header(raw: bytes, offset: int) -> tuple[int, int]:
    """(type, length), validated; ``offset`` is the connection byte offset, for errors."""
    kind, length = FRAME.unpack(raw)
    if kind == FRAME_DATA:
        if not 1 <= length <= MAX_DATA_FRAME:
            raise StreamError(f"data frame of {length} bytes", offset)
    elif kind in (FRAME_END, FRAME_KEEPALIVE):
        if length:
            raise StreamError(f"{'end' if kind == FRAME_END else 'keep-alive'} frame with {length} bytes of "
                              "payload", offset)
    elif kind == FRAME_VERDICT:
        if not 1 <= length <= MAX_MESSAGE + 1:
            raise StreamError(f"verdict frame of {length} bytes", offset)
    elif kind == FRAME_MARK:
        if length != MARK.size:
            raise StreamError(f"mark frame of {length} bytes", offset)
    else:
        raise StreamError(f"unknown frame type {kind}", offset)
    return kind, length


def encode_mark(sent: int) -> bytes:
    return frame_header(FRAME_MARK, MARK.size) + MARK.pack(sent)


def encode_verdict(result: int, message: str) -> bytes:
    body = bytes([result]) + _message(message)
    return frame_header(FRAME_VERDICT, len(body)) + body


def decode_verdict(body: bytes) -> tuple[int, str]:
    result = body[0]
    if result not in VERDICT_NAMES:
        raise StreamError(f"unknown verdict {result}")
    return result, _text(body[1:], "the verdict message")


# -- receiver messages -------------------------------------------------------------------------------


def reply(kind: int, body: bytes = b"") -> bytes:
    return REPLY.pack(REPLY_MAGIC, kind, len(body)) + body


def decode_reply_header(raw: bytes, max_length: int) -> tuple[int, int]:
    """(type, length) of a receiver message; StreamError for anything unexpected."""
    magic, kind, length = REPLY.unpack(raw)
    if magic != REPLY_MAGIC:
        raise StreamError(f"the peer is not a blocktrack receiver (reply magic {magic!r})")
    if kind not in REPLY_NAMES:
        raise StreamError(f"unknown receiver message type {kind}")
    limit = {ACK: ACK_BODY.size, REFUSE: REFUSE_HEAD.size + MAX_MESSAGE, ERROR: MAX_MESSAGE,
             KEEPALIVE: 0}.get(kind, max_length)
    if length > limit:
        raise StreamError(f"receiver {REPLY_NAMES[kind]} message of {length} bytes (at most {limit})")
    return kind, length


def bitmap_bytes(nchunks: int) -> int:
    return -(-nchunks // 8)


def encode_accept(target_size: int, nchunks: int, held: list[list[int]]) -> bytes:
    """``held``: inclusive [first, last] runs of chunks already on the target."""
    bits = bytearray(bitmap_bytes(nchunks))
    count = 0
    for first, last in held:
        for i in range(first, last + 1):
            bits[i >> 3] |= 1 << (i & 7)
        count += last - first + 1
    return reply(ACCEPT, ACCEPT_HEAD.pack(target_size, nchunks, count) + bytes(bits))


@dataclass(frozen=True)
class Accept:
    target_size: int
    nchunks: int
    held: list[int]  # chunk indexes already on the target's stable storage


def decode_accept(body: bytes, nchunks: int) -> Accept:
    if len(body) < ACCEPT_HEAD.size:
        raise StreamError("short ACCEPT message")
    target_size, their_nchunks, count = ACCEPT_HEAD.unpack_from(body)
    if their_nchunks != nchunks or len(body) != ACCEPT_HEAD.size + bitmap_bytes(nchunks):
        raise StreamError(f"ACCEPT for {their_nchunks} chunks, expected {nchunks}")
    bits = body[ACCEPT_HEAD.size:]
    held = [i for i in range(nchunks) if bits[i >> 3] >> (i & 7) & 1]
    if len(held) != count:
        raise StreamError(f"ACCEPT says {count} chunks held, its map has {len(held)}")
    return Accept(target_size, nchunks, held)


def encode_refuse(reason: int, message: str) -> bytes:
    return reply(REFUSE, REFUSE_HEAD.pack(reason) + _message(message))


def decode_refuse(body: bytes) -> tuple[int, str]:
    if len(body) < REFUSE_HEAD.size:
        raise StreamError("short REFUSE message")
    (reason,) = REFUSE_HEAD.unpack_from(body)
    return reason, _text(body[REFUSE_HEAD.size:], "the refusal message")


def encode_ack(received: int, durable: int) -> bytes:
    return reply(ACK, ACK_BODY.pack(received, durable))


def decode_ack(body: bytes) -> tuple[int, int]:
    if len(body) != ACK_BODY.size:
        raise StreamError(f"ACK of {len(body)} bytes")
    return ACK_BODY.unpack(body)


@dataclass(frozen=True)
class Result:
    algorithm: int
    scope: int
    chunks_written: int
    chunks_held: int
    nchunks: int
    digests: bytes   # nchunks x DIGEST_SIZE, chunk i at DIGEST_SIZE * i

    def digest(self, index: int) -> bytes:
        return self.digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]


def encode_result(scope: int, chunks_written: int, chunks_held: int, nchunks: int, digests) -> bytes:
    """``digests``: nchunks x DIGEST_SIZE bytes in chunk order (a bytes-like map)."""
    if len(digests) != nchunks * DIGEST_SIZE:
        raise ValueError(f"a digest map of {nchunks} chunks has {nchunks * DIGEST_SIZE} bytes, not {len(digests)}")
    head = RESULT_HEAD.pack(DIGEST_XXH3_128, scope, chunks_written, chunks_held, nchunks)
    return reply(RESULT, head + bytes(digests))


def result_max_length(nchunks: int) -> int:
    return RESULT_HEAD.size + DIGEST_SIZE * nchunks


def decode_result(body: bytes, nchunks: int | None = None) -> Result:
    """Decode a RESULT; with ``nchunks`` (the device's, from HELLO) it must be for that many chunks."""
    if len(body) < RESULT_HEAD.size:
        raise StreamError("short RESULT message")
    algorithm, scope, written, held, their_nchunks = RESULT_HEAD.unpack_from(body)
    if algorithm != DIGEST_XXH3_128:
        raise StreamError(f"unknown digest algorithm {algorithm}")
    if scope not in SCOPE_NAMES:
        raise StreamError(f"unknown digest scope {scope}")
    if nchunks is not None and their_nchunks != nchunks:
        raise StreamError(f"RESULT for {their_nchunks} chunks, expected {nchunks}")
    if len(body) != RESULT_HEAD.size + their_nchunks * DIGEST_SIZE:
        raise StreamError(f"RESULT with the digests of {their_nchunks} chunks has {len(body)} bytes")
    return Result(algorithm, scope, written, held, their_nchunks, bytes(body[RESULT_HEAD.size:]))


def encode_error(message: str) -> bytes:
    return reply(ERROR, _message(message))


def decode_text(body: bytes) -> str:
    return _text(body, "the receiver's message")


# -- the local control socket (blocktrack release) ---------------------------------------------------
#
# A Unix socket in the migration's state folder, owned by the running `blocktrack migrate`. One JSON
# object per line each way, UTF-8, at most MAX_CONTROL_LINE bytes: a request {"op": "status"} or
# {"op": "release", "mode": "thaw" | "retire"}, answered by {"ok": true, ...} or {"ok": false,
# "error": "..."}.

MAX_CONTROL_LINE = 64 * 1024


def encode_control(obj: dict) -> bytes:
    line = json.dumps(obj, sort_keys=True).encode("utf-8") + b"\n"
    if len(line) > MAX_CONTROL_LINE:
        raise ValueError("control message too long")
    return line


def decode_control(line: bytes) -> dict:
    if len(line) > MAX_CONTROL_LINE:
        raise StreamError("control message too long")
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StreamError(f"control message does not parse: {exc}") from None
    if not isinstance(obj, dict):
        raise StreamError("control message is not a JSON object")
    return obj


# -- pre-shared-key authentication (blocktrack.psk) -------------------------------------------------
#
# With --psk-file, right after the TLS handshake and before HELLO (or a plain stream's first byte),
# inside TLS. Python's ssl module has no TLS-PSK before 3.13, so TLS runs with a throw-away receiver
# certificate the sender does not verify, and both ends prove they hold the key by an HMAC-SHA256
# bound to that certificate (a man in the middle presents its own certificate, so the proofs it
# relays name the wrong one). Version 2 keys the HMACs with a per-connection scrypt derivation of
# the key, salted with both nonces, so each offline guess at the key from a captured proof costs one
# scrypt (blocktrack.psk has the threat model)::
#
#     receiver → sender   CHALLENGE   0 8 magic b"BTPSK\x00" + be16 version (2), 8 32 receiver nonce
#     sender → receiver   PROOF       0 8 magic, 8 32 sender nonce, 40 32 HMAC-SHA256(session key,
#                                     "blocktrack psk v2 client" || receiver nonce || sender nonce ||
#                                     SHA-256 of the receiver certificate's DER, as the sender saw it)
#     receiver → sender   VERDICT     0 8 magic, 8 1 status (0 accepted, 1 refused), 9 32 HMAC-SHA256(
#                                     session key, "blocktrack psk v2 server" || the same fields);
#                                     zeros when refused
#
#     session key = scrypt(key, salt = "blocktrack psk v2" || receiver nonce || sender nonce,
#                          N = 2^15, r = 8, p = 1, 32 bytes)
#
# "key" is the key file's bytes without surrounding whitespace (hex or base64 text is used as text).
# The sender's nonce in the salt is what a man in the middle cannot choose, so no table of guesses
# can be computed before a connection. Version 1 (blocktrack before the scrypt step) keyed the HMACs
# with the key itself; a version-1 peer fails on the version field and each side names the version
# it met.

PSK_MAGIC_PREFIX = b"BTPSK\x00"
PSK_VERSION = 2
PSK_MAGIC = PSK_MAGIC_PREFIX + PSK_VERSION.to_bytes(2, "big")
PSK_NONCE_LEN = 32
PSK_CHALLENGE = struct.Struct(">8s32s")
PSK_PROOF = struct.Struct(">8s32s32s")
PSK_VERDICT = struct.Struct(">8sB32s")
PSK_ACCEPTED, PSK_REFUSED = 0, 1
PSK_LABEL_CLIENT = b"blocktrack psk v2 client"
PSK_LABEL_SERVER = b"blocktrack psk v2 server"
PSK_KDF_SALT = b"blocktrack psk v2"
PSK_SCRYPT_N, PSK_SCRYPT_R, PSK_SCRYPT_P = 1 << 15, 8, 1  # 32 MiB of memory per derivation
PSK_SESSION_KEY_LEN = 32


class PskVersionError(StreamError):
    """The peer speaks blocktrack's pre-shared-key exchange, in another version."""

    def __init__(self, version: int):
        self.version = version
        super().__init__(f"the peer speaks pre-shared-key authentication version {version}, this blocktrack "
                         f"speaks version {PSK_VERSION}: run the same blocktrack release on both ends")


def decode_psk(layout: struct.Struct, raw: bytes) -> tuple:
    fields = layout.unpack(raw)
    magic = fields[0]
    if magic[:len(PSK_MAGIC_PREFIX)] == PSK_MAGIC_PREFIX and magic != PSK_MAGIC:
        raise PskVersionError(int.from_bytes(magic[len(PSK_MAGIC_PREFIX):], "big"))
    if magic != PSK_MAGIC:
        raise StreamError("the peer does not speak blocktrack's pre-shared-key authentication "
                          f"(magic {magic!r}; is it using --tls-cert or --insecure?)")
    return fields[1:]
