"""The NBD handshake, server side: fixed newstyle option haggling, or the oldstyle greeting.

Fixed newstyle (proto.md, "Fixed newstyle negotiation"): the server greets, the client answers with
its flags, then sends options one at a time, waiting for the final reply to each. We answer:

- NBD_OPT_EXPORT_NAME: the export's size and flags, and transmission starts. An unknown name cannot
  be answered with an error in this option, so the spec requires a hard disconnect.
- NBD_OPT_INFO / NBD_OPT_GO: NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE always, NBD_INFO_NAME and
  NBD_INFO_DESCRIPTION when asked, then NBD_REP_ACK (GO then starts transmission); an unknown
  name is NBD_REP_ERR_UNKNOWN.
- NBD_OPT_LIST: one NBD_REP_SERVER per export.
- NBD_OPT_ABORT: NBD_REP_ACK, then we close.
- NBD_OPT_STRUCTURED_REPLY: NBD_REP_ACK once; a second time, or with data, NBD_REP_ERR_INVALID.
- NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: see metacontext.py. SET before structured
  replies were negotiated is NBD_REP_ERR_INVALID (the spec's SHOULD), and it replaces the selection
  even when it fails.
- NBD_OPT_STARTTLS: NBD_REP_ERR_POLICY (we run in the spec's NOTLS mode).
- anything else: NBD_REP_ERR_UNSUP, and we keep parsing (the option's length tells us how much to
  skip).

Malformed option data is NBD_REP_ERR_INVALID; option data longer than we are willing to buffer
(MAX_OPTION_LENGTH) is skipped and answered NBD_REP_ERR_TOO_BIG. A bad option magic, unknown client
flags, or an EXPORT_NAME we cannot satisfy are ProtocolViolation: the caller hangs up.

The oldstyle greeting (size and flags, no options) exists for the kernel backend's sake: it is what
a client that cannot negotiate expects. A connection handed straight to the kernel needs no
handshake at all (``Session.for_kernel``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Callable, Iterable

from blocktrack.nbd import metacontext
from blocktrack.nbd import protocol as p
from blocktrack.nbd.export import Export
from blocktrack.nbd.sockio import ProtocolViolation, discard, recv_exact, send_all

# Option data we accept to skip (and answer TOO_BIG) rather than hang up on.
_MAX_SKIPPABLE_OPTION = 16 << 20
# A client that keeps sending options forever is not negotiating.
_MAX_OPTIONS = 10_000


def transmission_flags(export: Export, structured: bool) -> int:
    """The transmission flags for ``export`` (the kernel backend passes these to NBD_SET_FLAGS)."""
    flags = (p.NBD_FLAG_HAS_FLAGS | p.NBD_FLAG_SEND_FLUSH | p.NBD_FLAG_SEND_FUA | p.NBD_FLAG_SEND_CACHE
             # No cache of our own: a flush on one connection covers writes made on every other.
             | p.NBD_FLAG_CAN_MULTI_CONN)
    if export.read_only:
        flags |= p.NBD_FLAG_READ_ONLY
    else:
        flags |= p.NBD_FLAG_SEND_TRIM | p.NBD_FLAG_SEND_WRITE_ZEROES | p.NBD_FLAG_SEND_FAST_ZERO
    if structured:
        flags |= p.NBD_FLAG_SEND_DF  # a READ with NBD_CMD_FLAG_DF goes as one data chunk, even streamed
    return flags


def block_size_info(export: Export) -> tuple[int, int, int]:
    """(minimum, preferred, maximum payload) for NBD_INFO_BLOCK_SIZE.

    Minimum 1: unaligned requests are served through the page cache. Preferred: at least a page,
    and the O_DIRECT alignment, below which requests leave the fast path."""
    return 1, max(p.DEFAULT_PREFERRED_BLOCK, export.align), p.MAX_PAYLOAD


@dataclass
class Session:
    """What the handshake agreed: the export, reply style and selected metadata contexts."""

    export: Export
    structured: bool = False
    contexts: tuple = ()
    style: str = "newstyle"
    flags: int = field(default=0)

    def __post_init__(self):
        if not self.flags:
            self.flags = transmission_flags(self.export, self.structured)

    @classmethod
    def for_kernel(cls, export: Export) -> "Session":
        """A connection with no handshake on the wire (the socket is given to the kernel's NBD
        client, which speaks simple replies only; size and flags reach it through ioctls)."""
        return cls(export, structured=False, style="none")


class _OptionError(Exception):
    """Answer the current option with an error reply (and go on negotiating)."""

    def __init__(self, reply: int, message: str):
        self.reply = reply
        super().__init__(message)


class Negotiation:
    """One connection's fixed newstyle handshake. ``run()`` returns the Session, or None when the
    client ended the handshake (NBD_OPT_ABORT); it raises ProtocolViolation or PeerClosed."""

    def __init__(self, sock: socket.socket, find_export: Callable[[str], Export | None],
                 exports: Callable[[], Iterable[Export]], stopping: Callable[[], bool]):
        self.sock = sock
        self.find_export = find_export
        self.exports = exports
        self.stopping = stopping
        self.structured = False
        self.contexts: tuple = ()
        self.no_zeroes = False
        self.options_seen: list[str] = []

    # -- wire helpers ---------------------------------------------------------------------------

    def _recv(self, length: int, what: str) -> bytes:
        buf = bytearray(length)
        recv_exact(self.sock, memoryview(buf), what)
        return bytes(buf)

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        send_all(self.sock, [p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, option, reply, len(data)), data])

    def _error(self, option: int, reply: int, message: str) -> None:
        self._reply(option, reply, message.encode()[: p.MAX_STRING])

    # -- the handshake --------------------------------------------------------------------------

    def run(self) -> Session | None:
        send_all(self.sock, [p.HELLO.pack(p.NBDMAGIC, p.IHAVEOPT, p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES)])
        (client_flags,) = p.CLIENT_FLAGS.unpack(self._recv(p.CLIENT_FLAGS.size, "client flags"))
        known = p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES
        if client_flags & ~known:
            raise ProtocolViolation(f"client set unknown handshake flags {client_flags:#x}")
        self.no_zeroes = bool(client_flags & p.NBD_FLAG_C_NO_ZEROES)
        # A client without NBD_FLAG_C_FIXED_NEWSTYLE may only send EXPORT_NAME; answering its other
        # options the fixed way anyway is allowed (the spec's MAY) and costs it nothing.
        for _ in range(_MAX_OPTIONS):
            magic, option, length = p.OPTION_HEADER.unpack(self._recv(p.OPTION_HEADER.size, "option header"))
            if magic != p.IHAVEOPT:
                raise ProtocolViolation(f"bad option magic {magic:#x}")
            self.options_seen.append(p.option_name(option))
            if length > p.MAX_OPTION_LENGTH:
                if option == p.NBD_OPT_EXPORT_NAME or length > _MAX_SKIPPABLE_OPTION:
                    raise ProtocolViolation(f"{p.option_name(option)} with {length} bytes of data")
                discard(self.sock, length, memoryview(bytearray(64 * 1024)), "option data")
                self._error(option, p.NBD_REP_ERR_TOO_BIG, f"option data of {length} bytes is too long")
                continue
            data = self._recv(length, "option data")
            if self.stopping() and option != p.NBD_OPT_ABORT:
                if option == p.NBD_OPT_EXPORT_NAME:
                    raise ProtocolViolation("server shutting down")
                self._error(option, p.NBD_REP_ERR_SHUTDOWN, "the server is shutting down")
                continue
            try:
                result = self._option(option, data)
            except _OptionError as exc:
                self._error(option, exc.reply, str(exc))
                continue
            if result is not _CONTINUE:
                return result
        raise ProtocolViolation(f"more than {_MAX_OPTIONS} options")

    def _option(self, option: int, data: bytes):
        if option == p.NBD_OPT_EXPORT_NAME:
            return self._export_name(data)
        if option in (p.NBD_OPT_INFO, p.NBD_OPT_GO):
            return self._info_or_go(option, data)
        if option == p.NBD_OPT_ABORT:
            try:
                self._reply(option, p.NBD_REP_ACK)
            except OSError:
                pass  # the client may close without waiting for our ACK; that is fine
            return None
        if option == p.NBD_OPT_LIST:
            if data:
                raise _OptionError(p.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            for export in self.exports():
                name = export.name.encode()
                self._reply(option, p.NBD_REP_SERVER, p.U32.pack(len(name)) + name + export.description.encode())
            self._reply(option, p.NBD_REP_ACK)
            return _CONTINUE
        if option == p.NBD_OPT_STRUCTURED_REPLY:
            if data:
                raise _OptionError(p.NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            if self.structured:
                raise _OptionError(p.NBD_REP_ERR_INVALID, "structured replies were already negotiated")
            self.structured = True
            self._reply(option, p.NBD_REP_ACK)
            return _CONTINUE
        if option in (p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT):
            return self._meta_context(option, data)
        if option == p.NBD_OPT_STARTTLS:
            raise _OptionError(p.NBD_REP_ERR_POLICY, "this server does not offer TLS")
        raise _OptionError(p.NBD_REP_ERR_UNSUP, f"{p.option_name(option)} is not supported")

    def _lookup(self, raw: bytes) -> Export:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _OptionError(p.NBD_REP_ERR_INVALID, "export name is not UTF-8") from None
        export = self.find_export(name)
        if export is None:
            raise _OptionError(p.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
        return export

    def _export_name(self, data: bytes) -> Session:
        try:
            export = self._lookup(data)
        except _OptionError as exc:
            # NBD_OPT_EXPORT_NAME has no error reply: the spec requires hanging up.
            raise ProtocolViolation(f"NBD_OPT_EXPORT_NAME: {exc}") from None
        flags = transmission_flags(export, self.structured)
        reply = p.EXPORT_NAME_REPLY.pack(export.size, flags)
        send_all(self.sock, [reply, b"" if self.no_zeroes else bytes(p.OLDSTYLE_ZEROES)])
        return Session(export, self.structured, self.contexts, "newstyle", flags)

    def _info_or_go(self, option: int, data: bytes):
        if len(data) < 6:
            raise _OptionError(p.NBD_REP_ERR_INVALID, f"{p.option_name(option)} data too short")
        (name_length,) = p.U32.unpack_from(data)
        if name_length > len(data) - 6:
            raise _OptionError(p.NBD_REP_ERR_INVALID, "export name longer than the option data")
        name, rest = data[4:4 + name_length], data[4 + name_length:]
        (count,) = p.U16.unpack_from(rest)
        if len(rest) != 2 + 2 * count:
            raise _OptionError(p.NBD_REP_ERR_INVALID, f"{count} information requests do not match the data length")
        requests = {p.U16.unpack_from(rest, 2 + 2 * i)[0] for i in range(count)}
        export = self._lookup(name)
        flags = transmission_flags(export, self.structured)
        self._reply(option, p.NBD_REP_INFO, p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, export.size, flags))
        self._reply(option, p.NBD_REP_INFO, p.INFO_BLOCK_SIZE.pack(p.NBD_INFO_BLOCK_SIZE, *block_size_info(export)))
        if p.NBD_INFO_NAME in requests:
            self._reply(option, p.NBD_REP_INFO, p.INFO_TYPE.pack(p.NBD_INFO_NAME) + export.name.encode())
        if p.NBD_INFO_DESCRIPTION in requests:
            self._reply(option, p.NBD_REP_INFO,
                        p.INFO_TYPE.pack(p.NBD_INFO_DESCRIPTION) + export.description.encode()[: p.MAX_STRING])
        self._reply(option, p.NBD_REP_ACK)
        if option == p.NBD_OPT_INFO:
            return _CONTINUE
        return Session(export, self.structured, self.contexts, "newstyle", flags)

    def _meta_context(self, option: int, data: bytes):
        setting = option == p.NBD_OPT_SET_META_CONTEXT
        if setting:
            self.contexts = ()  # replaced even when this request fails
            if not self.structured:
                raise _OptionError(p.NBD_REP_ERR_INVALID,
                                   "NBD_OPT_SET_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first")
        name, queries = _parse_meta_request(data)
        self._lookup(name)
        try:
            if setting:
                selected = metacontext.select_contexts(queries)
                for context in selected:
                    self._reply(option, p.NBD_REP_META_CONTEXT,
                                p.META_CONTEXT_ID.pack(context.context_id) + context.name.encode())
                self.contexts = tuple(selected)
            else:
                for context_name in metacontext.list_contexts(queries):
                    # Ids in a list reply are reserved: zero.
                    self._reply(option, p.NBD_REP_META_CONTEXT, p.META_CONTEXT_ID.pack(0) + context_name.encode())
        except metacontext.InvalidQuery as exc:
            raise _OptionError(p.NBD_REP_ERR_INVALID, str(exc)) from None
        self._reply(option, p.NBD_REP_ACK)
        return _CONTINUE


_CONTINUE = object()


def _parse_meta_request(data: bytes) -> tuple[bytes, list[str]]:
    """Split LIST/SET_META_CONTEXT data into the export name and the query strings."""

    def invalid(message: str) -> _OptionError:
        return _OptionError(p.NBD_REP_ERR_INVALID, message)

    if len(data) < 8:
        raise invalid("metadata context request too short")
    (name_length,) = p.U32.unpack_from(data)
    if 4 + name_length + 4 > len(data):
        raise invalid("export name longer than the option data")
    name = data[4:4 + name_length]
    pos = 4 + name_length
    (count,) = p.U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise invalid(f"{count} queries announced, data ends after {len(queries)}")
        (length,) = p.U32.unpack_from(data, pos)
        pos += 4
        if length > p.MAX_STRING or pos + length > len(data):
            raise invalid("query longer than the option data or than 4096 bytes")
        try:
            queries.append(data[pos:pos + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise invalid("query is not UTF-8") from None
        pos += length
    if pos != len(data):
        raise invalid(f"{len(data) - pos} bytes after the last query")
    return name, queries


def send_oldstyle(sock: socket.socket, export: Export) -> Session:
    """The oldstyle greeting: magic, size, flags, 124 zero bytes; then transmission."""
    flags = transmission_flags(export, False)
    send_all(sock, [p.OLDSTYLE_HELLO.pack(p.NBDMAGIC, p.CLISERV_MAGIC, export.size, flags),
                    bytes(p.OLDSTYLE_ZEROES)])
    return Session(export, False, (), "oldstyle", flags)
