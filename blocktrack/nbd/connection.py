"""The transmission phase of one NBD connection: requests in, replies out, in any order.

Threads. Each connection has one *reader* (the thread that ran the handshake) and ``workers``
worker threads. The reader alone reads the socket, through a receive buffer: one ``recv_into``
usually brings several 28-byte request headers (clients pipeline them), and a WRITE's payload goes
into a pooled, page-aligned buffer (what already sat in the receive buffer is copied, the rest is
received straight into it). The reader queues each request; workers take them, do the I/O on the
Export (``preadv``/``pwritev``, GIL released) and hand the reply to ``_complete``. Several requests
are in flight and replies leave in completion order, each tagged with its request's cookie.

Sending. Replies are written by whichever worker holds ``_send_lock``, one ``sendmsg`` per batch:
a worker appends its reply to ``_outq`` and, if the lock is free, sends everything queued (header
and data buffers gathered, never joined); if another worker is sending, that one takes the new reply
along. Whoever sent a reply then *finishes* its request: the buffer goes back to the pool, the
connection's in-flight budget and the server's gate are released, counters updated (counters are
only touched under ``_send_lock``). Under load this turns many small sends into few large ones.

Budget. The reader bounds what is in flight with ``_budget`` (bytes of buffers held and a request
count): when it is spent, the reader stops reading the socket until a request finishes, so a fast
client cannot make us buffer without limit.

Dirty marking happens inside Export.write_from / trim / write_zeroes, after the I/O and before they
return; the reply is built only after that, so every change is marked before the client hears of
it (ARCHITECTURE.md, invariant 1).

The server's gate (server.Gate) sits between reading a request and queueing it: while the server is
frozen (the cutover), requests are read but held; ``freeze()`` returns once every admitted request
has finished its I/O and marking.

Errors. Requests the spec lets us refuse get the spec's error in a reply and the connection goes on:
unknown commands and flags, and BLOCK_STATUS without contexts, are NBD_EINVAL; a read, trim, cache
or block status past the end NBD_EINVAL; a write or write-zeroes past the end NBD_ENOSPC; a write
to a read-only export NBD_EPERM; a READ or WRITE longer than MAX_PAYLOAD NBD_EOVERFLOW (READ with
structured replies) or NBD_EINVAL. A refused WRITE's payload is read and dropped so the stream
stays in step. I/O errors are mapped to the spec's values (protocol.nbd_error). A bad request magic
cannot be resynchronised: we hang up. With structured replies, errors carry a message.

Ending. NBD_CMD_DISC, end of stream, a bad magic or a server shutdown stop the reader; requests
already queued are finished and answered, the workers exit, and the socket is closed. A client that
disconnects in the middle of a WRITE payload has nothing written: the data is written only once
all of it has arrived.
"""

from __future__ import annotations

import collections
import queue
import socket
import threading
from dataclasses import dataclass

from blocktrack.nbd import metacontext
from blocktrack.nbd import protocol as p
from blocktrack.nbd.export import BufferPool
from blocktrack.nbd.handshake import Session
from blocktrack.nbd.sockio import PeerClosed, recv_exact, send_all

_RECEIVE_BUFFER = 256 * 1024     # request headers (and small payloads) arrive through this
_SEND_BATCH = 512                # buffers per sendmsg (IOV_MAX is 1024)
_HEADER = p.REQUEST.size

_READ, _WRITE = p.NBD_CMD_READ, p.NBD_CMD_WRITE
_FAST_FLAGS = p.NBD_CMD_FLAG_FUA  # READ/WRITE with only these flags take the fast path


class Request:
    __slots__ = ("command", "flags", "cookie", "offset", "length", "buf", "cost", "budgeted", "admitted",
                 "bytes_read", "bytes_written", "failed")

    def __init__(self, command: int, flags: int, cookie: int, offset: int, length: int):
        self.command = command
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.buf = None            # pooled mmap: a WRITE's payload or a READ's data
        self.cost = 0              # budget bytes held
        self.budgeted = False      # holds a share of the connection's in-flight budget
        self.admitted = False      # passed the server's gate (so must call gate.done())
        self.bytes_read = 0
        self.bytes_written = 0
        self.failed = False


@dataclass
class ConnectionStats:
    requests: int = 0
    bytes_read: int = 0         # served to the client by READ
    bytes_written: int = 0      # written to the export by WRITE
    errors: int = 0


class _Receiver:
    """Buffered reads from the socket: whole request headers, and payloads into caller buffers."""

    def __init__(self, sock: socket.socket, size: int = _RECEIVE_BUFFER):
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def _fill(self, what: str) -> None:
        if self.start:
            pending = self.end - self.start
            self.buf[:pending] = self.buf[self.start:self.end]
            self.start, self.end = 0, pending
        try:
            n = self.sock.recv_into(self.view[self.end:])
        except (ConnectionResetError, BrokenPipeError):
            n = 0
        if n == 0:
            raise PeerClosed(self.end > self.start, what)
        self.end += n

    def header(self) -> tuple:
        while self.end - self.start < _HEADER:
            self._fill("request header")
        fields = p.REQUEST.unpack_from(self.buf, self.start)
        self.start += _HEADER
        return fields

    def payload_into(self, view: memoryview) -> None:
        have = min(self.end - self.start, len(view))
        if have:
            view[:have] = self.view[self.start:self.start + have]
            self.start += have
        if have < len(view):
            recv_exact(self.sock, view[have:], "WRITE payload")

    def skip(self, length: int) -> None:
        while length:
            if self.start == self.end:
                self._fill("WRITE payload")
            have = min(self.end - self.start, length)
            self.start += have
            length -= have


class Connection:
    """Serve ``session`` on ``sock`` until the client leaves or the server stops: ``run()``."""

    def __init__(self, sock: socket.socket, session: Session, *, gate, pool: BufferPool, workers: int = 4,
                 max_inflight_bytes: int = 64 << 20, max_inflight_requests: int = 128):
        self.sock = sock
        self.session = session
        self.export = session.export
        self.gate = gate
        self.pool = pool
        self.nworkers = max(1, workers)
        self.max_inflight_bytes = max(max_inflight_bytes, p.MAX_PAYLOAD)
        self.max_inflight_requests = max(1, max_inflight_requests)
        self.stats = ConnectionStats()
        self.end_reason = "open"
        self.internal_errors: list[str] = []
        self._contexts = list(session.contexts)
        self._structured = session.structured
        self._size = self.export.size
        self._budget = threading.Condition()
        self._inflight_bytes = 0
        self._inflight_requests = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._send_lock = threading.Lock()
        self._outq: collections.deque = collections.deque()
        self._broken = False

    # -- the reader -----------------------------------------------------------------------------

    def run(self) -> str:
        """Serve until the end; return why it ended (also in ``end_reason``)."""
        workers = [threading.Thread(target=self._work, name=f"nbd-worker-{i}", daemon=True)
                   for i in range(self.nworkers)]
        for worker in workers:
            worker.start()
        try:
            self.end_reason = self._read_requests(_Receiver(self.sock))
        finally:
            for _ in workers:
                self._queue.put(None)
            for worker in workers:
                worker.join()
            self._flush_replies()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        return self.end_reason

    def _read_requests(self, rx: _Receiver) -> str:
        size = self._size
        read_only = self.export.read_only
        put = self._queue.put
        while True:
            if self._broken:
                return "reply failed: client gone"
            try:
                magic, flags, command, cookie, offset, length = rx.header()
            except PeerClosed as exc:
                return "client closed the connection mid-request" if exc.partial else "client closed the connection"
            except OSError as exc:
                return f"receive failed: {exc.strerror or exc}"
            if magic != p.REQUEST_MAGIC:
                return f"bad request magic {magic:#x}: hung up"
            request = Request(command, flags, cookie, offset, length)
            # The common case, checked in one line; anything else gets the full check below.
            fast = (command <= _WRITE and not flags & ~_FAST_FLAGS and offset + length <= size
                    and length <= p.MAX_PAYLOAD and not (command == _WRITE and read_only))
            if not fast:
                if command == p.NBD_CMD_DISC:
                    return "client disconnected (NBD_CMD_DISC)"
                refusal = self._check(request)
                if refusal:
                    try:
                        if command == _WRITE:
                            rx.skip(length)
                    except PeerClosed:
                        return "client closed the connection in the middle of a WRITE payload (nothing written)"
                    except OSError as exc:
                        return f"receive failed: {exc.strerror or exc}"
                    request.failed = True
                    self._complete(request, self._error_reply(request, *refusal))
                    continue
            if command == _WRITE:
                self._take_budget(request, length)
                request.buf = self.pool.get(length)
                try:
                    rx.payload_into(memoryview(request.buf)[:length])
                except PeerClosed:
                    self._finish(request)
                    return "client closed the connection in the middle of a WRITE payload (nothing written)"
                except OSError as exc:
                    self._finish(request)
                    return f"receive failed: {exc.strerror or exc}"
            elif command == _READ:
                self._take_budget(request, length)
                request.buf = self.pool.get(length)
            else:
                self._take_budget(request, 0)
            if not self.gate.admit():
                self._finish(request)
                return "server shutting down"
            request.admitted = True
            put(request)

    def _check(self, r: Request) -> tuple[int, str] | None:
        """None when the request may run, else (NBD error, message) for its reply."""
        valid = p.VALID_COMMAND_FLAGS.get(r.command)
        if valid is None:
            return p.NBD_EINVAL, f"unknown command {r.command}"
        if r.flags & ~valid:
            return p.NBD_EINVAL, f"flags {r.flags:#x} not valid for {p.command_name(r.command)}"
        if r.flags & p.NBD_CMD_FLAG_DF and not self._structured:
            return p.NBD_EINVAL, "NBD_CMD_FLAG_DF needs structured replies"
        writes = r.command in (p.NBD_CMD_WRITE, p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES)
        if writes and self.export.read_only:
            return p.NBD_EPERM, "the export is read-only"
        if r.command in (p.NBD_CMD_READ, p.NBD_CMD_WRITE) and r.length > p.MAX_PAYLOAD:
            overflow = self._structured and r.command == p.NBD_CMD_READ
            return (p.NBD_EOVERFLOW if overflow else p.NBD_EINVAL,
                    f"{p.command_name(r.command)} of {r.length} bytes exceeds the maximum of {p.MAX_PAYLOAD}")
        if r.command == p.NBD_CMD_BLOCK_STATUS:
            if not self._contexts:
                return p.NBD_EINVAL, "no metadata context was selected (NBD_OPT_SET_META_CONTEXT)"
            if r.length == 0:
                return p.NBD_EINVAL, "block status of 0 bytes"
        if r.command != p.NBD_CMD_FLUSH and r.offset + r.length > self._size:
            error = p.NBD_ENOSPC if r.command in (p.NBD_CMD_WRITE, p.NBD_CMD_WRITE_ZEROES) else p.NBD_EINVAL
            return error, (f"{p.command_name(r.command)} of {r.length} bytes at {r.offset} goes past the end "
                           f"of the export ({self._size} bytes)")
        return None

    # -- in-flight budget -----------------------------------------------------------------------

    def _take_budget(self, request: Request, length: int) -> None:
        """Wait until the request fits in the in-flight budget (one request always fits), take it."""
        cost = BufferPool.size_class(length) if length else 0
        with self._budget:
            while self._inflight_requests and (self._inflight_bytes + cost > self.max_inflight_bytes
                                               or self._inflight_requests >= self.max_inflight_requests):
                self._budget.wait()
            self._inflight_bytes += cost
            self._inflight_requests += 1
        request.cost = cost
        request.budgeted = True

    def _finish(self, request: Request) -> None:
        """Give back what the request held: buffer, budget, its place at the gate."""
        if request.buf is not None:
            self.pool.put(request.buf)
            request.buf = None
        if request.budgeted:
            request.budgeted = False
            with self._budget:
                self._inflight_bytes -= request.cost
                self._inflight_requests -= 1
                self._budget.notify()
        if request.admitted:
            request.admitted = False
            self.gate.done()

    # -- workers --------------------------------------------------------------------------------

    def _work(self) -> None:
        get = self._queue.get
        serve = self._serve
        while True:
            request = get()
            if request is None:
                return
            try:
                reply = serve(request)
            except Exception as exc:  # a bug: answer EIO rather than leave the client waiting
                self.internal_errors.append(f"{p.command_name(request.command)}: {type(exc).__name__}: {exc}")
                request.failed = True
                reply = self._error_reply(request, p.NBD_EIO, "internal server error")
            self._complete(request, reply)

    def _serve(self, r: Request) -> list:
        """Do the request; return its reply as a list of buffers."""
        export = self.export
        command = r.command
        fua = bool(r.flags & p.NBD_CMD_FLAG_FUA)
        try:
            if command == _READ:
                view = memoryview(r.buf)[: r.length]
                export.read_into(view, r.offset)
                r.bytes_read = r.length
                return self._data_reply(r, view)
            if command == _WRITE:
                export.write_from(memoryview(r.buf)[: r.length], r.offset, fua=fua)
                r.bytes_written = r.length
            elif command == p.NBD_CMD_FLUSH:
                export.flush()
            elif command == p.NBD_CMD_TRIM:
                export.trim(r.offset, r.length, fua=fua)
            elif command == p.NBD_CMD_WRITE_ZEROES:
                export.write_zeroes(r.offset, r.length, fua=fua,
                                    may_trim=not r.flags & p.NBD_CMD_FLAG_NO_HOLE,
                                    fast=bool(r.flags & p.NBD_CMD_FLAG_FAST_ZERO))
            elif command == p.NBD_CMD_CACHE:
                export.cache(r.offset, r.length)
            elif command == p.NBD_CMD_BLOCK_STATUS:
                return self._block_status_reply(r)
            # A simple reply is allowed for any payload-free success, structured replies or not.
            return [p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, r.cookie)]
        except OSError as exc:
            r.failed = True
            message = f"{p.command_name(command)} at {r.offset}: {exc.strerror or exc}"
            at = r.offset if command not in (p.NBD_CMD_FLUSH, p.NBD_CMD_BLOCK_STATUS) and r.length else None
            return self._error_reply(r, p.nbd_error(exc.errno or 0), message, at)

    # -- replies --------------------------------------------------------------------------------

    def _complete(self, request: Request, buffers: list) -> None:
        """Queue a reply; send (with any others queued) unless another thread is sending."""
        outq = self._outq
        outq.append((request, buffers))
        lock = self._send_lock
        # Whoever holds the lock re-checks the queue after releasing it, so no reply is stranded.
        while outq and lock.acquire(blocking=False):
            try:
                self._send_queued()
            finally:
                lock.release()

    def _send_queued(self) -> None:
        outq = self._outq
        stats = self.stats
        while outq:
            batch, done = [], []
            while outq and len(batch) < _SEND_BATCH:
                request, buffers = outq.popleft()
                batch.extend(buffers)
                done.append(request)
            if not self._broken:
                try:
                    send_all(self.sock, batch)
                except OSError:
                    self._hang_up()
            for request in done:
                stats.requests += 1
                stats.bytes_read += request.bytes_read
                stats.bytes_written += request.bytes_written
                stats.errors += request.failed
                self._finish(request)

    def _flush_replies(self) -> None:
        with self._send_lock:
            self._send_queued()

    def _hang_up(self) -> None:
        self._broken = True
        try:
            self.sock.shutdown(socket.SHUT_RD)  # wake the reader
        except OSError:
            pass

    def _data_reply(self, r: Request, view: memoryview) -> list:
        if not self._structured:
            return [p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, r.cookie), view]
        if not r.length:
            return [p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.NBD_REPLY_FLAG_DONE,
                                            p.NBD_REPLY_TYPE_NONE, r.cookie, 0)]
        # One data chunk, marked final: the data was read before the header goes out, so no error
        # can come after it.
        return [p.STRUCTURED_OFFSET_DATA.pack(p.STRUCTURED_REPLY_MAGIC, p.NBD_REPLY_FLAG_DONE,
                                              p.NBD_REPLY_TYPE_OFFSET_DATA, r.cookie, 8 + r.length, r.offset), view]

    def _error_reply(self, r: Request, error: int, message: str, offset: int | None = None) -> list:
        if not self._structured:
            return [p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, r.cookie)]
        text = message.encode()[: p.MAX_STRING]
        if offset is not None:
            payload = p.ERROR_PAYLOAD.pack(error, len(text)) + text + p.U64.pack(offset)
            kind = p.NBD_REPLY_TYPE_ERROR_OFFSET
        else:
            payload = p.ERROR_PAYLOAD.pack(error, len(text)) + text
            kind = p.NBD_REPLY_TYPE_ERROR
        header = p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.NBD_REPLY_FLAG_DONE, kind, r.cookie, len(payload))
        return [header, payload]

    def _block_status_reply(self, r: Request) -> list:
        end = min(r.offset + r.length, self._size)
        req_one = bool(r.flags & p.NBD_CMD_FLAG_REQ_ONE)
        limit = 1 if req_one else p.MAX_EXTENTS
        chunks = []
        for i, context in enumerate(self._contexts):
            if context.name == metacontext.BASE_ALLOCATION:
                extents = self.export.allocation(r.offset, end, limit)
            else:
                extents = metacontext.dirty_extents(self.export.dirty, r.offset, end, limit)
            if req_one:
                extents = metacontext.clip_one(extents, r.length)
            payload = p.U32.pack(context.context_id) + b"".join(p.BLOCK_DESCRIPTOR.pack(n, f) for n, f in extents)
            flags = p.NBD_REPLY_FLAG_DONE if i == len(self._contexts) - 1 else 0
            chunks.append(p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, flags, p.NBD_REPLY_TYPE_BLOCK_STATUS,
                                                  r.cookie, len(payload)))
            chunks.append(payload)
        return chunks
