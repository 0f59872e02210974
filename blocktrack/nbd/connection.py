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
along. Whoever sent a reply then *finishes* its request: the reply's views of the buffer are
released (``memoryview.release``) and the batch that carried them dropped, and only then does the
buffer go back to the pool, so nothing refers to a buffer the pool may lend again; the budgets and
the server's gate are released, counters updated (counters are only touched under ``_send_lock``).
Under load this turns many small sends into few large ones.

Budget. The reader bounds what is in flight (budget.Budget): each READ or WRITE takes the size of
its buffer from the connection's budget (bytes and a request count) and from the server's, shared
by all its connections. When either is spent, the reader stops reading the socket until a request
finishes, so neither one client nor many can make the server buffer without limit.

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
cannot be resynchronised: we hang up. With structured replies, errors carry a message. A buffer
that cannot be mapped (ENOMEM) fails its request and the connection goes on.

Bugs. No thread dies of an exception: one raised while serving a request answers it with NBD_EIO;
one raised while sending replies or reading requests hangs up (the stream may be out of step).
Either way the request is finished (buffer, budgets, gate), so the server's accounting stays right
and a freeze can still complete; the error is kept in ``internal_errors`` and passed to
``on_internal_error``.

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
from typing import Callable

from blocktrack.nbd import metacontext
from blocktrack.nbd import protocol as p
from blocktrack.nbd.budget import Budget
from blocktrack.nbd.export import BufferPool
from blocktrack.nbd.handshake import Session
from blocktrack.nbd.sockio import PeerClosed, recv_exact, send_all

_RECEIVE_BUFFER = 256 * 1024     # request headers (and small payloads) arrive through this
_SEND_BATCH = 512                # buffers per sendmsg (IOV_MAX is 1024)
_HEADER = p.REQUEST.size
_KEEP_INTERNAL_ERRORS = 100      # internal errors remembered per connection (the first ones)
STREAM_PIECE = 4 << 20           # a READ longer than this is read and sent in pieces of this size

_READ, _WRITE = p.NBD_CMD_READ, p.NBD_CMD_WRITE
_FAST_FLAGS = p.NBD_CMD_FLAG_FUA  # READ/WRITE with only these flags take the fast path


class Request:
    __slots__ = ("command", "flags", "cookie", "offset", "length", "buf", "reply", "cost", "budgeted", "shared",
                 "shared_cost",
                 "admitted", "bytes_read", "bytes_written", "failed")

    def __init__(self, command: int, flags: int, cookie: int, offset: int, length: int):
        self.command = command
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.buf = None            # pooled mmap: a WRITE's payload or a READ's data
        self.reply = None          # buffers to send (a READ's data as a memoryview of ``buf``)
        self.cost = 0              # budget bytes held
        self.budgeted = False      # holds a share of the connection's in-flight budget
        self.shared = False        # holds a share of the server's in-flight budget
        self.shared_cost = 0       # ... of this many bytes
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
                 max_inflight_bytes: int = 64 << 20, max_inflight_requests: int = 128,
                 shared_budget: Budget | None = None, on_internal_error: Callable[[str], None] | None = None):
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
        self.internal_error_count = 0
        self.on_internal_error = on_internal_error
        self._contexts = list(session.contexts)
        self._structured = session.structured
        self._size = self.export.size
        self._budget = Budget(self.max_inflight_bytes, self.max_inflight_requests)
        self.shared_budget = shared_budget
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
        except Exception as exc:  # a bug in the reader: hang up (see "Bugs" above)
            self._note_internal_error("reading requests", exc)
            self.end_reason = f"internal error: {type(exc).__name__}: {exc}: hung up"
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
                    request.reply = self._error_reply(request, *refusal)
                    self._complete(request)
                    continue
            try:
                ended = self._take_in(request, rx)
            except Exception as exc:  # a bug: give back what the request holds, then hang up
                self._note_internal_error(p.command_name(command), exc)
                ended = f"internal error: {type(exc).__name__}: {exc}: hung up"
            if ended is not None:
                self._finish(request)
                return ended
            if request.reply is not None:  # refused after all (no buffer): answer it, not queued
                self._complete(request)
                continue
            put(request)

    def _take_in(self, request: Request, rx: _Receiver) -> str | None:
        """Budgets, buffer, payload and the gate for a request that may run. Returns why the
        connection ends (the caller finishes the request), or None: the request is admitted, or
        refused with ``request.reply`` set."""
        command, length = request.command, request.length
        # A streamed READ holds no buffer until a worker sends it (_stream_read): here it takes
        # only its place in the connection's request count.
        data = command == _WRITE or (command == _READ and length <= STREAM_PIECE)
        if not self._take_budget(request, BufferPool.size_class(length) if data else 0):
            return "server shutting down"
        if data:
            try:
                request.buf = self.pool.get(length)
            except OSError as exc:  # no memory to map: this request fails, the connection goes on
                request.failed = True
                request.reply = self._error_reply(request, p.nbd_error(exc.errno or 0),
                                                  f"no buffer for {length} bytes: {exc.strerror or exc}")
                if command == _WRITE:
                    try:
                        rx.skip(length)
                    except PeerClosed:
                        return "client closed the connection in the middle of a WRITE payload (nothing written)"
                    except OSError as err:
                        return f"receive failed: {err.strerror or err}"
                return None
            if command == _WRITE:
                try:
                    rx.payload_into(memoryview(request.buf)[:length])
                except PeerClosed:
                    return "client closed the connection in the middle of a WRITE payload (nothing written)"
                except OSError as exc:
                    return f"receive failed: {exc.strerror or exc}"
        if not self.gate.admit():
            return "server shutting down"
        request.admitted = True
        return None

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

    def _take_budget(self, request: Request, cost: int) -> bool:
        """Wait until ``cost`` fits in the connection's budget and then in the server's, and take
        it (see budget.Budget); False once the server is stopping."""
        if not self._budget.take(cost):
            return False
        request.cost = cost
        request.budgeted = True
        if cost and self.shared_budget is not None:
            if not self.shared_budget.take(cost):
                return False
            request.shared = True
            request.shared_cost = cost
        return True

    def stop(self) -> None:
        """The server is stopping: a reader waiting for budget gives up (called by NbdServer)."""
        self._budget.close()

    def _finish(self, request: Request) -> None:
        """Give back what the request held: its reply's views and its buffer, its budgets, its place
        at the gate. Idempotent; the budgets and the gate are given back whatever else fails."""
        try:
            reply, request.reply = request.reply, None
            if reply is not None:
                for part in reply:
                    if isinstance(part, memoryview):
                        part.release()  # nothing can read the buffer through the reply any more
                del reply
            buf, request.buf = request.buf, None
            if buf is not None:
                self.pool.put(buf)
        finally:
            if request.budgeted:
                request.budgeted = False
                self._budget.give(request.cost)
            if request.shared:
                request.shared = False
                self.shared_budget.give(request.shared_cost)
            if request.admitted:
                request.admitted = False
                self.gate.done()

    def _note_internal_error(self, what: str, exc: BaseException, request: Request | None = None) -> None:
        if request is not None:
            request.failed = True
        text = f"{what}: {type(exc).__name__}: {exc}"
        self.internal_error_count += 1
        if len(self.internal_errors) < _KEEP_INTERNAL_ERRORS:
            self.internal_errors.append(text)
        if self.on_internal_error is not None:
            try:
                self.on_internal_error(text)
            except Exception:
                pass

    # -- workers --------------------------------------------------------------------------------

    def _work(self) -> None:
        get = self._queue.get
        serve = self._serve
        while True:
            request = get()
            if request is None:
                return
            try:
                if request.command == _READ and request.length > STREAM_PIECE:
                    self._stream_read(request)
                    continue
                try:
                    request.reply = serve(request)
                except Exception as exc:  # a bug: answer EIO rather than leave the client waiting
                    self._note_internal_error(p.command_name(request.command), exc, request)
                    request.reply = self._error_reply(request, p.NBD_EIO, "internal server error")
                self._complete(request)
            except Exception as exc:
                # Nothing above raises by design; if something does, the reply may be lost or half
                # sent: hang up, and give back what the request holds (finishing twice is harmless).
                self._note_internal_error(f"answering {p.command_name(request.command)}", exc, request)
                self._hang_up()
                self._finish(request)

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

    # -- streamed reads -------------------------------------------------------------------------

    def _stream_read(self, r: Request) -> None:
        """Answer a READ longer than STREAM_PIECE piece by piece: read a piece, send it, read the
        next into the same buffer. A simple reply's data must follow its header unbroken, so the
        worker holds ``_send_lock`` from the first piece to the last (with structured replies it
        lets other replies out between two chunks); a client that does not read its replies
        therefore holds one piece of the server's memory, not 32 MiB per request.

        The piece's buffer is taken from the server's shared budget. Waiting for it while holding
        the send lock could deadlock (this connection's own queued replies may be what holds the
        budget, and only the lock holder sends them), so when there is no room the worker lets the
        lock go, waits for room, and only then takes the lock again."""
        lock = self._send_lock
        shared = self.shared_budget
        piece = BufferPool.size_class(STREAM_PIECE)
        lock.acquire()
        try:
            if shared is not None and not r.shared:
                if not shared.try_take(piece):
                    lock.release()
                    try:
                        took = shared.take(piece)
                    finally:
                        lock.acquire()
                    if not took:
                        r.failed = True
                        r.reply = self._error_reply(r, p.NBD_ESHUTDOWN, "server shutting down")
                        self._outq.append(r)
                        self._send_queued()
                        return
                r.shared = True
                r.shared_cost = piece
            self._send_queued()            # replies queued before this one go first
            r.buf = self.pool.get(STREAM_PIECE)
            self._send_pieces(r)
            self._account(r)
            self._finish(r)
        except Exception as exc:  # a bug, or no memory for the buffer: the stream may be out of step
            self._note_internal_error(f"streaming {p.command_name(r.command)}", exc, r)
            self._hang_up()
            self._finish(r)
        finally:
            lock.release()
        # Replies queued while this one was streaming must not be stranded (see _complete).
        while self._outq and lock.acquire(blocking=False):
            try:
                self._send_queued()
            finally:
                lock.release()

    def _send_pieces(self, r: Request) -> None:
        """Read and send ``r`` in pieces (send lock held). With structured replies each piece is
        its own data chunk and an error after some pieces is an error chunk; with simple replies
        (or NBD_CMD_FLAG_DF) there is one header for all the data, sent with the first piece, so
        an error after it can only be told by hanging up, as the spec asks."""
        chunked = self._structured and not r.flags & p.NBD_CMD_FLAG_DF
        view = memoryview(r.buf)
        sent = 0
        try:
            while sent < r.length and not self._broken:
                n = min(STREAM_PIECE, r.length - sent)
                part = view[:n]
                try:
                    self.export.read_into(part, r.offset + sent)
                except OSError as exc:
                    r.failed = True
                    if sent and not chunked:
                        self._hang_up()
                        return
                    message = f"READ at {r.offset + sent}: {exc.strerror or exc}"
                    self._send_now(self._error_reply(r, p.nbd_error(exc.errno or 0), message, r.offset + sent))
                    return
                last = sent + n == r.length
                if chunked:
                    header = [p.STRUCTURED_OFFSET_DATA.pack(p.STRUCTURED_REPLY_MAGIC, p.NBD_REPLY_FLAG_DONE if last else 0,
                                                            p.NBD_REPLY_TYPE_OFFSET_DATA, r.cookie, 8 + n,
                                                            r.offset + sent)]
                elif not sent:
                    header = self._data_reply(r, None)[:1]
                else:
                    header = []
                self._send_now([*header, part])
                sent += n
                if chunked and self._outq and not last:
                    self._send_queued()    # other replies may go between two chunks of this one
            r.bytes_read = sent
        finally:
            view.release()

    def _send_now(self, buffers: list) -> None:
        """Send under the send lock; a failure to send hangs up."""
        if self._broken:
            return
        try:
            send_all(self.sock, buffers)
        except OSError:
            self._hang_up()

    def _account(self, request: Request) -> None:
        stats = self.stats
        stats.requests += 1
        stats.bytes_read += request.bytes_read
        stats.bytes_written += request.bytes_written
        stats.errors += request.failed

    # -- replies --------------------------------------------------------------------------------

    def _complete(self, request: Request) -> None:
        """Queue a request's reply; send (with any others queued) unless another thread is sending."""
        outq = self._outq
        outq.append(request)
        lock = self._send_lock
        # Whoever holds the lock re-checks the queue after releasing it, so no reply is stranded.
        while outq and lock.acquire(blocking=False):
            try:
                self._send_queued()
            finally:
                lock.release()

    def _send_queued(self) -> None:
        outq = self._outq
        while outq:
            batch, done = [], []
            while outq and len(batch) < _SEND_BATCH:
                request = outq.popleft()
                batch.extend(request.reply or ())
                done.append(request)
            if not self._broken:
                try:
                    send_all(self.sock, batch)
                except OSError:
                    self._hang_up()
                except Exception as exc:  # a bug: part of a reply may have gone out; the stream is lost
                    self._note_internal_error("sending replies", exc)
                    self._hang_up()
            batch.clear()  # the batch's views of the buffers go before the buffers go back
            for request in done:
                self._account(request)
                try:
                    self._finish(request)
                except Exception as exc:  # the budgets and the gate were given back all the same
                    self._note_internal_error(f"finishing {p.command_name(request.command)}", exc)

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
