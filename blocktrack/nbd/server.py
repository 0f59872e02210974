"""NbdServer: listening sockets, one thread per connection, a gate for freezing, clean shutdown.

Shape. The server owns one Export (the served device and its dirty map), a BufferPool shared by
its connections, and a Gate. ``serve_forever()`` accepts on its listening sockets (Unix and TCP)
in the calling thread; every accepted socket gets a connection thread that runs the handshake and
then the transmission phase (connection.Connection, with its own worker threads).

``serve_socket(sock, handshake=...)`` serves one socket that is already connected, in a new thread,
without any listener. This is the entry point of the kernel backend: one end of a socketpair goes
to the kernel's NBD client with NBD_SET_SOCK (handshake "none": size and flags reach the kernel by
ioctl, and the kernel speaks simple replies only), the other end comes here. "newstyle" and
"oldstyle" serve a socket whose peer does the handshake itself (nbd-client, a test).

The gate. Every request passes ``Gate.admit()`` after it was read and before it is queued, and
``Gate.done()`` after its reply was sent. ``freeze()`` makes admit() hold new requests and returns
once nothing admitted is still in flight: from then on the export does not change and the dirty map
is complete; ``thaw()`` lets the held requests go. A cutover freezes, takes the last dirty set,
copies it, and then either thaws (on failure) or shuts down. Shutdown also closes the gate, so held
requests end their connections instead of waiting.

Stopping. ``shutdown()`` may be called from any thread or a signal handler: it stops accepting,
closes the gate, and shuts the read side of every connection, so each finishes and answers what it
already read and then closes (the spec's "wait for inflight requests ... prior to a hard
disconnect"). ``close()`` waits for all of that, removes Unix socket files and closes listeners.

Events. ``on_event(name, fields)`` is called (from any thread) with "listening", "connected",
"transmission", "disconnected" and "stopped"; the CLI prints them as JSON lines.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import stat
import threading
from typing import Callable

from blocktrack.errors import UsageError
from blocktrack.nbd.connection import Connection
from blocktrack.nbd.export import BufferPool, Export
from blocktrack.nbd.handshake import Negotiation, Session, send_oldstyle
from blocktrack.nbd.sockio import PeerClosed, ProtocolViolation

_SOCKET_BUFFER = 4 << 20
HANDSHAKES = ("newstyle", "oldstyle", "none")


class Gate:
    """Admission of requests across all connections: freeze() holds new ones and waits for the
    admitted ones to finish; thaw() releases; close() refuses everything from then on."""

    def __init__(self):
        self._cond = threading.Condition()
        self._frozen = False
        self._closed = False
        self._inflight = 0
        self._held = 0

    def admit(self) -> bool:
        """Wait while frozen; False when the gate was closed (the server is stopping)."""
        with self._cond:
            if self._frozen and not self._closed:
                self._held += 1
                self._cond.notify_all()
                try:
                    while self._frozen and not self._closed:
                        self._cond.wait()
                finally:
                    self._held -= 1
            if self._closed:
                return False
            self._inflight += 1
            return True

    def done(self) -> None:
        with self._cond:
            self._inflight -= 1
            if self._inflight == 0:
                self._cond.notify_all()

    def freeze(self, timeout: float | None = None) -> bool:
        """Hold new requests; True once none is in flight (False if ``timeout`` passed first,
        still frozen)."""
        with self._cond:
            self._frozen = True
            return self._cond.wait_for(lambda: self._inflight == 0, timeout)

    def thaw(self) -> None:
        with self._cond:
            self._frozen = False
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered."""
        return self._inflight

    @property
    def held(self) -> int:
        """Requests read and waiting at the frozen gate (one per connection at most)."""
        return self._held

    def wait_held(self, count: int, timeout: float | None = None) -> bool:
        """Wait until at least ``count`` requests are held (tests and the cutover's bookkeeping)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._held >= count, timeout)


class ConnectionHandle:
    """A served connection: its id, peer, thread, and (once in transmission) its Connection."""

    def __init__(self, conn_id: int, sock: socket.socket, peer: str):
        self.id = conn_id
        self.sock = sock
        self.peer = peer
        self.thread: threading.Thread | None = None
        self.connection: Connection | None = None
        self.end_reason: str | None = None

    def join(self, timeout: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True


class NbdServer:
    """Serve one Export over NBD. See the module docstring for threads, the gate and stopping."""

    def __init__(self, export: Export, *, workers: int = 4, max_inflight_bytes: int = 64 << 20,
                 handshake_timeout: float | None = 60.0, pool_bytes: int = 128 << 20,
                 on_event: Callable[[str, dict], None] | None = None):
        self.export = export
        self.workers = workers
        self.max_inflight_bytes = max_inflight_bytes
        self.handshake_timeout = handshake_timeout
        self.gate = Gate()
        self.pool = BufferPool(pool_bytes)
        self.on_event = on_event
        self._lock = threading.Lock()
        self._connections: dict[int, ConnectionHandle] = {}
        self._next_id = 1
        self._listeners: list[tuple[socket.socket, str | None]] = []  # (socket, unix path)
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.total_connections = 0

    # -- exports --------------------------------------------------------------------------------

    def find_export(self, name: str) -> Export | None:
        """The export a client named; the empty name is the default export (the spec's "")."""
        if name == "" or name == self.export.name:
            return self.export
        return None

    def exports(self) -> list[Export]:
        return [self.export]

    # -- listening ------------------------------------------------------------------------------

    def listen_unix(self, path) -> str:
        path = os.fspath(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise UsageError(f"{path} exists and is not a socket; refusing to replace it")
            if _unix_socket_alive(path):
                raise UsageError(f"{path}: another server is listening there")
            os.unlink(path)  # a stale socket left by a server that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        self._listeners.append((sock, path))
        self._event("listening", socket=path)
        return path

    def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound_host, bound_port = sock.getsockname()[:2]
        self._listeners.append((sock, None))
        self._event("listening", host=bound_host, port=bound_port)
        return bound_host, bound_port

    def serve_forever(self) -> None:
        """Accept and serve connections until shutdown(); then wait for them to finish."""
        if not self._listeners:
            raise UsageError("the server has nowhere to listen")
        selector = selectors.DefaultSelector()
        try:
            for sock, _path in self._listeners:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj == self._wake_r:
                        continue
                    self._accept(key.fileobj)
        finally:
            selector.close()
            self.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._event("accept_failed", error=exc.strerror)
                return
            raise
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the spec recommends
            peer = f"{addr[0]}:{addr[1]}"
        else:
            peer = "unix"
        self.serve_socket(sock, handshake="newstyle", peer=peer)

    # -- serving one socket ---------------------------------------------------------------------

    def serve_socket(self, sock: socket.socket, *, handshake: str = "newstyle", peer: str = "socket") -> ConnectionHandle:
        """Serve an already-connected socket in a new thread; return its handle at once."""
        if handshake not in HANDSHAKES:
            raise ValueError(f"handshake must be one of {HANDSHAKES}, not {handshake!r}")
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
            except OSError:
                pass
        with self._lock:
            handle = ConnectionHandle(self._next_id, sock, peer)
            self._next_id += 1
            self._connections[handle.id] = handle
            self.total_connections += 1
            stopping = self._stopping.is_set()
        if stopping:
            _shut(sock, socket.SHUT_RDWR)
        handle.thread = threading.Thread(target=self._serve_connection, args=(handle, handshake),
                                         name=f"nbd-conn-{handle.id}", daemon=True)
        handle.thread.start()
        return handle

    def _serve_connection(self, handle: ConnectionHandle, handshake: str) -> None:
        sock = handle.sock
        self._event("connected", id=handle.id, peer=handle.peer)
        reason = "closed"
        try:
            session = self._handshake(sock, handshake)
            if session is None:
                reason = "client ended the handshake (NBD_OPT_ABORT)"
            elif self._stopping.is_set():
                reason = "server shutting down"
            else:
                self._event("transmission", id=handle.id, style=session.style, structured=session.structured,
                            contexts=[c.name for c in session.contexts], flags=session.flags)
                handle.connection = Connection(sock, session, gate=self.gate, pool=self.pool, workers=self.workers,
                                               max_inflight_bytes=self.max_inflight_bytes)
                reason = handle.connection.run()
                if self._stopping.is_set() and reason.startswith("client closed"):
                    reason = "server shutting down"
        except PeerClosed as exc:
            reason = f"client closed the connection during the handshake ({exc})"
        except ProtocolViolation as exc:
            reason = f"protocol violation: {exc}: hung up"
        except socket.timeout:
            reason = "handshake timed out"
        except OSError as exc:
            reason = f"connection failed: {exc.strerror or exc}"
        finally:
            try:
                sock.close()
            except OSError:
                pass
            handle.end_reason = reason
            with self._lock:
                self._connections.pop(handle.id, None)
            fields = {"id": handle.id, "reason": reason}
            if handle.connection is not None:
                stats = handle.connection.stats
                fields.update(requests=stats.requests, bytes_read=stats.bytes_read,
                              bytes_written=stats.bytes_written, errors=stats.errors)
                if handle.connection.internal_errors:
                    fields["internal_errors"] = handle.connection.internal_errors[:10]
            self._event("disconnected", **fields)

    def _handshake(self, sock: socket.socket, handshake: str) -> Session | None:
        if handshake == "none":
            return Session.for_kernel(self.export)
        if handshake == "oldstyle":
            return send_oldstyle(sock, self.export)
        sock.settimeout(self.handshake_timeout)
        session = Negotiation(sock, self.find_export, self.exports, self._stopping.is_set).run()
        sock.settimeout(None)
        return session

    # -- freezing -------------------------------------------------------------------------------

    def freeze(self, timeout: float | None = None) -> bool:
        """Hold new requests on every connection; True once none is in flight."""
        return self.gate.freeze(timeout)

    def thaw(self) -> None:
        self.gate.thaw()

    # -- stopping -------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def connections(self) -> list[ConnectionHandle]:
        with self._lock:
            return list(self._connections.values())

    def shutdown(self) -> None:
        """Begin stopping (safe from any thread and from a signal handler)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self.gate.close()
        for handle in self.connections():
            _shut(handle.sock, socket.SHUT_RD)

    def close(self) -> None:
        """Stop, wait for every connection to finish, remove listeners. Idempotent."""
        self.shutdown()
        for sock, path in self._listeners:
            sock.close()
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self._listeners.clear()
        for handle in self.connections():
            handle.join()
        self.pool.clear()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        if not getattr(self, "_stopped_event_sent", False):
            self._stopped_event_sent = True
            self._event("stopped", connections=self.total_connections, dirty_chunks=self.export.dirty.count())

    def _event(self, name: str, **fields) -> None:
        if self.on_event is not None:
            self.on_event(name, fields)


def _shut(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _unix_socket_alive(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()
