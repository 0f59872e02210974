"""A small synchronous NBD client: enough to test the server, diagnose one, or read its dirty map.

It speaks fixed newstyle with NBD_OPT_GO (or NBD_OPT_EXPORT_NAME), structured replies and metadata
contexts, and it keeps several requests in flight when asked (``request()`` then ``reply()``, with
replies matched by cookie in whatever order they come). Its low-level methods (``send``,
``send_option``, ``request`` with any flags, lengths and magic) let tests send what a correct client
never would.
"""

from __future__ import annotations

import itertools
import socket
from dataclasses import dataclass, field

from blocktrack.nbd import protocol as p
from blocktrack.nbd.sockio import PeerClosed, recv_exact, send_all


class NbdError(Exception):
    """The server answered a request with an error."""

    def __init__(self, error: int, message: str = "", command: int | None = None):
        self.error = error
        self.message = message
        what = p.command_name(command) if command is not None else "request"
        super().__init__(f"{what} failed: NBD error {error}" + (f" ({message})" if message else ""))


class OptionError(Exception):
    """The server answered an option with an error reply."""

    def __init__(self, option: int, reply: int, message: str = ""):
        self.option = option
        self.reply = reply
        self.message = message
        super().__init__(f"{p.option_name(option)}: reply {reply:#x}" + (f" ({message})" if message else ""))


@dataclass
class Reply:
    cookie: int
    error: int = 0
    message: str = ""
    data: bytearray = field(default_factory=bytearray)                   # READ data, reassembled
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # context id → extents
    chunk_types: list[int] = field(default_factory=list)                 # structured chunk types, in order
    error_offset: int | None = None


class NbdClient:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.size = 0
        self.flags = 0
        self.structured = False
        self.contexts: dict[str, int] = {}
        self._cookies = itertools.count(1)
        self._pending: dict[int, tuple[int, int, int]] = {}  # cookie → (command, offset, length)
        self._partial: dict[int, Reply] = {}

    @classmethod
    def unix(cls, path, timeout: float | None = None) -> "NbdClient":
        """Connect to a Unix socket; ``timeout`` bounds every later wait (None: wait forever)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(path))
        return cls(sock)

    @classmethod
    def tcp(cls, host: str, port: int, timeout: float | None = None) -> "NbdClient":
        sock = socket.create_connection((host, port), timeout=timeout)
        return cls(sock)

    # -- raw I/O --------------------------------------------------------------------------------

    def send(self, *buffers) -> None:
        send_all(self.sock, list(buffers))

    def recv(self, length: int) -> bytes:
        buf = bytearray(length)
        recv_exact(self.sock, memoryview(buf))
        return bytes(buf)

    def at_eof(self) -> bool:
        """True when the server closed the connection (reads nothing else: call when idle)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    # -- handshake ------------------------------------------------------------------------------

    def read_greeting(self) -> int:
        """Read the newstyle greeting; return the handshake flags."""
        magic, opt_magic, flags = p.HELLO.unpack(self.recv(p.HELLO.size))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise ValueError(f"not a newstyle NBD server (magics {magic:#x} {opt_magic:#x})")
        return flags

    def send_option(self, option: int, data: bytes = b"", magic: int = p.IHAVEOPT) -> None:
        self.send(p.OPTION_HEADER.pack(magic, option, len(data)), data)

    def read_option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = p.OPTION_REPLY_HEADER.unpack(self.recv(p.OPTION_REPLY_HEADER.size))
        if magic != p.OPTION_REPLY_MAGIC:
            raise ValueError(f"bad option reply magic {magic:#x}")
        return option, reply, self.recv(length)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option, return its replies up to the final one (raise OptionError on an error)."""
        self.send_option(option, data)
        replies = []
        while True:
            got, reply, payload = self.read_option_reply()
            if got != option:
                raise ValueError(f"reply for option {got}, expected {option}")
            replies.append((reply, payload))
            if reply & p.NBD_REP_FLAG_ERROR:
                raise OptionError(option, reply, payload.decode(errors="replace"))
            if reply == p.NBD_REP_ACK:
                return replies

    def handshake(self, name: str = "", *, structured: bool = True, contexts=(), go: bool = True,
                  client_flags: int = p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES) -> None:
        self.read_greeting()
        self.send(p.CLIENT_FLAGS.pack(client_flags))
        if structured:
            self.option(p.NBD_OPT_STRUCTURED_REPLY)
            self.structured = True
        if contexts:
            for reply, payload in self.option(p.NBD_OPT_SET_META_CONTEXT, meta_context_data(name, contexts)):
                if reply == p.NBD_REP_META_CONTEXT:
                    (context_id,) = p.META_CONTEXT_ID.unpack_from(payload)
                    self.contexts[payload[4:].decode()] = context_id
        if go:
            for reply, payload in self.option(p.NBD_OPT_GO, info_data(name, [p.NBD_INFO_BLOCK_SIZE])):
                if reply == p.NBD_REP_INFO and p.INFO_TYPE.unpack_from(payload)[0] == p.NBD_INFO_EXPORT:
                    _, self.size, self.flags = p.INFO_EXPORT.unpack(payload)
        else:
            self.send_option(p.NBD_OPT_EXPORT_NAME, name.encode())
            self.size, self.flags = p.EXPORT_NAME_REPLY.unpack(self.recv(p.EXPORT_NAME_REPLY.size))
            if not client_flags & p.NBD_FLAG_C_NO_ZEROES:
                self.recv(p.OLDSTYLE_ZEROES)

    # -- transmission ---------------------------------------------------------------------------

    def request(self, command: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes | None = None,
                cookie: int | None = None, magic: int = p.REQUEST_MAGIC) -> int:
        """Send one request (WRITE: ``payload`` follows, ``length`` defaults to its size)."""
        cookie = next(self._cookies) if cookie is None else cookie
        if payload is not None and not length:
            length = len(payload)
        self._pending[cookie] = (command, offset, length)
        self.send(p.REQUEST.pack(magic, flags, command, cookie, offset, length), payload or b"")
        return cookie

    def reply(self) -> Reply:
        """The next complete reply, whichever request it answers."""
        while True:
            (magic,) = p.U32.unpack(self.recv(4))
            if magic == p.SIMPLE_REPLY_MAGIC:
                error, cookie = p.U32.unpack(self.recv(4))[0], p.U64.unpack(self.recv(8))[0]
                command, _offset, length = self._pending.pop(cookie, (None, 0, 0))
                reply = Reply(cookie, error)
                if command == p.NBD_CMD_READ and not error and not self.structured:
                    reply.data = bytearray(self.recv(length))
                return reply
            if magic != p.STRUCTURED_REPLY_MAGIC:
                raise ValueError(f"bad reply magic {magic:#x}")
            _, flags, kind, cookie, length = p.STRUCTURED_REPLY.unpack(p.U32.pack(magic) + self.recv(16))
            payload = self.recv(length)
            reply = self._partial.setdefault(cookie, Reply(cookie))
            reply.chunk_types.append(kind)
            command, offset, req_length = self._pending.get(cookie, (None, 0, 0))
            if kind == p.NBD_REPLY_TYPE_OFFSET_DATA:
                (chunk_offset,) = p.U64.unpack_from(payload)
                if len(reply.data) < req_length:
                    reply.data.extend(bytes(req_length - len(reply.data)))
                start = chunk_offset - offset
                reply.data[start:start + length - 8] = payload[8:]
            elif kind == p.NBD_REPLY_TYPE_OFFSET_HOLE:
                if len(reply.data) < req_length:
                    reply.data.extend(bytes(req_length - len(reply.data)))
            elif kind == p.NBD_REPLY_TYPE_BLOCK_STATUS:
                (context_id,) = p.U32.unpack_from(payload)
                reply.extents[context_id] = [p.BLOCK_DESCRIPTOR.unpack_from(payload, 4 + 8 * i)
                                             for i in range((len(payload) - 4) // 8)]
            elif kind & (1 << 15):
                reply.error, message_length = p.ERROR_PAYLOAD.unpack_from(payload)
                reply.message = payload[6:6 + message_length].decode(errors="replace")
                if kind == p.NBD_REPLY_TYPE_ERROR_OFFSET:
                    (reply.error_offset,) = p.U64.unpack_from(payload, 6 + message_length)
            if flags & p.NBD_REPLY_FLAG_DONE:
                self._pending.pop(cookie, None)
                return self._partial.pop(cookie)

    def call(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes | None = None) -> Reply:
        """One request and its reply (no other request may be in flight); raise NbdError."""
        cookie = self.request(command, offset, length, flags, payload)
        reply = self.reply()
        if reply.cookie != cookie:
            raise ValueError(f"reply for cookie {reply.cookie}, expected {cookie}")
        if reply.error:
            raise NbdError(reply.error, reply.message, command)
        return reply

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        return bytes(self.call(p.NBD_CMD_READ, offset, length, flags).data)

    def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.call(p.NBD_CMD_WRITE, offset, len(data), flags, data)

    def flush(self) -> None:
        self.call(p.NBD_CMD_FLUSH)

    def trim(self, offset: int, length: int, flags: int = 0) -> None:
        self.call(p.NBD_CMD_TRIM, offset, length, flags)

    def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        self.call(p.NBD_CMD_WRITE_ZEROES, offset, length, flags)

    def block_status(self, offset: int, length: int, flags: int = 0) -> dict[str, list[tuple[int, int]]]:
        reply = self.call(p.NBD_CMD_BLOCK_STATUS, offset, length, flags)
        names = {context_id: name for name, context_id in self.contexts.items()}
        return {names.get(context_id, str(context_id)): extents for context_id, extents in reply.extents.items()}

    def disconnect(self) -> None:
        try:
            self.request(p.NBD_CMD_DISC)
        except OSError:
            pass
        self.close()


def info_data(name: str, requests=()) -> bytes:
    """Data of NBD_OPT_INFO / NBD_OPT_GO."""
    raw = name.encode()
    return p.U32.pack(len(raw)) + raw + p.U16.pack(len(requests)) + b"".join(p.U16.pack(r) for r in requests)


def meta_context_data(name: str, queries) -> bytes:
    """Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    raw = name.encode()
    out = p.U32.pack(len(raw)) + raw + p.U32.pack(len(queries))
    for query in queries:
        q = query.encode()
        out += p.U32.pack(len(q)) + q
    return out


__all__ = ["NbdClient", "NbdError", "OptionError", "PeerClosed", "Reply", "info_data", "meta_context_data"]
