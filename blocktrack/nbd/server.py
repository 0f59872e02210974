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

Limits. Whatever its clients do, the server holds at most ``max_total_inflight_bytes`` of request
data (READ and WRITE buffers, in flight and kept for reuse; each connection also at most
``max_inflight_bytes``: budget.Budget), and serves at most ``max_connections`` accepted connections
(each a thread plus ``workers`` workers). At the connection limit it stops accepting: newcomers
wait in the listen backlog (as qemu-nbd does with --shared) and are accepted when a connection
ends. Sockets handed to ``serve_socket()`` directly (the kernel backend) are not counted.

Accepting when out of descriptors. accept() failing with EMFILE/ENFILE/ENOBUFS/ENOMEM leaves the
connection in the backlog, so the listener stays readable and retrying at once would spin. The
server stops polling its listeners for ``ACCEPT_RETRY`` seconds (or until a connection ends and
frees a descriptor) and goes on serving the connections it has.

Events. ``on_event(name, fields)`` is called (from any thread) with "listening", "connected",
"transmission", "disconnected" and "stopped"; the CLI prints them as JSON lines. Conditions that
can recur quickly are reported at most once per ``REPORT_INTERVAL`` seconds, with ``times`` (how
often it happened since the last report): "accept_failed", "connection_limit" (stopped accepting
at max_connections), "inflight_limit" (a reader waits for the shared in-flight budget) and
"internal_error" (a bug, answered with EIO or a hang-up: connection.py).
"""

from __future__ import annotations

import errno
import math
import os
import selectors
import signal
import socket
import stat
import threading
import time
from typing import Callable

from blocktrack.errors import UsageError
from blocktrack.nbd import protocol as p
from blocktrack.nbd.budget import Budget
from blocktrack.nbd.connection import Connection
from blocktrack.nbd.export import BufferPool, Export
from blocktrack.nbd.handshake import Negotiation, Session, send_oldstyle
from blocktrack.nbd.sockio import PeerClosed, ProtocolViolation
from blocktrack.nbd.unixsocket import bind_private

_SOCKET_BUFFER = 4 << 20
HANDSHAKES = ("newstyle", "oldstyle", "none")

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_INFLIGHT = 256 << 20                 # request data held by the whole server
DEFAULT_MAX_INFLIGHT_PER_CONNECTION = 64 << 20
DEFAULT_SOCKET_MODE = 0o600
ACCEPT_RETRY = 0.5       # seconds without accepting after accept() ran out of descriptors or memory
REPORT_INTERVAL = 10.0   # seconds between two reports of the same recurring condition
_ACCEPT_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


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


class _Throttle:
    """When to report a condition that may recur many times a second: at most once per interval."""

    def __init__(self, interval: float):
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._times: dict[str, int] = {}

    def due(self, key: str) -> int:
        """Count one occurrence; return how many to report now (0: not yet)."""
        now = time.monotonic()
        with self._lock:
            times = self._times.get(key, 0) + 1
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._times[key] = times
                return 0
            self._last[key] = now
            self._times[key] = 0
            return times


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

    def __init__(self, export: Export, *, workers: int = 4,
                 max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_PER_CONNECTION,
                 max_total_inflight_bytes: int = DEFAULT_MAX_INFLIGHT,
                 max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
                 handshake_timeout: float | None = 60.0, pool_bytes: int = 128 << 20,
                 on_event: Callable[[str, dict], None] | None = None):
        if max_total_inflight_bytes < p.MAX_PAYLOAD:
            raise ValueError(f"the server's in-flight budget ({max_total_inflight_bytes} bytes) must hold "
                             f"the largest request ({p.MAX_PAYLOAD} bytes)")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.export = export
        self.workers = workers
        # A connection may hold at least one request of the largest size (connection.Connection).
        self.max_inflight_bytes = min(max(max_inflight_bytes, p.MAX_PAYLOAD), max_total_inflight_bytes)
        self.max_total_inflight_bytes = max_total_inflight_bytes
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.gate = Gate()
        self.budget = Budget(max_total_inflight_bytes, on_wait=self._budget_spent)
        self.pool = BufferPool(pool_bytes, limit_bytes=max_total_inflight_bytes)
        self.on_event = on_event
        self._throttle = _Throttle(REPORT_INTERVAL)
        # Reentrant: shutdown() may run in a signal handler while this thread holds the lock.
        self._lock = threading.RLock()
        self._connections: dict[int, ConnectionHandle] = {}
        self._next_id = 1
        self._listeners: list[tuple[socket.socket, str | None]] = []  # (socket, unix path)
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._accept_retry_at = 0.0
        self.total_connections = 0

    @property
    def limits(self) -> dict:
        """The bounds this server keeps (for a JSON report)."""
        return {"max_connections": self.max_connections, "threads_per_connection": self.workers,
                "max_inflight_bytes": self.max_total_inflight_bytes,
                "max_inflight_bytes_per_connection": self.max_inflight_bytes}

    # -- exports --------------------------------------------------------------------------------

    def find_export(self, name: str) -> Export | None:
        """The export a client named; the empty name is the default export (the spec's "")."""
        if name == "" or name == self.export.name:
            return self.export
        return None

    def exports(self) -> list[Export]:
        return [self.export]

    # -- listening ------------------------------------------------------------------------------

    def listen_unix(self, path, *, mode: int = DEFAULT_SOCKET_MODE, gid: int | None = None) -> str:
        """Listen on a new Unix socket at ``path`` with file mode ``mode`` (and group ``gid``), never
        wider even for a moment, whatever the umask (unixsocket.py)."""
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
            bind_private(sock, path, mode=mode, gid=gid)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EEXIST:
                raise UsageError(f"{path} appeared while the server was starting; refusing to replace it") from None
            raise UsageError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        try:
            sock.listen(64)
        except OSError as exc:
            sock.close()
            _unlink(path)
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

    def serve_forever(self, *, wake_on_signals: bool = False) -> None:
        """Accept and serve connections until shutdown(); then wait for them to finish.

        ``wake_on_signals`` (main thread only; for a caller whose signal handlers call shutdown()):
        the kernel may deliver a signal to any thread, and CPython runs the handler in the main
        thread only when that thread next runs Python code, so a signal taken by a worker would
        leave this loop asleep in select() and the handler never run (SIGTERM sometimes did not
        stop `blocktrack serve`). With this, every signal also wakes the loop (signal.set_wakeup_fd)."""
        if not self._listeners:
            raise UsageError("the server has nowhere to listen")
        selector = selectors.DefaultSelector()
        previous_wakeup = None
        if wake_on_signals:
            previous_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            for sock, _path in self._listeners:
                sock.setblocking(False)
            selector.register(self._wake_r, selectors.EVENT_READ)
            polling = False
            while not self._stopping.is_set():
                pause = self._accept_pause()
                if polling != (pause == 0):
                    polling = not polling
                    for sock, _path in self._listeners:
                        if polling:
                            selector.register(sock, selectors.EVENT_READ)
                        else:
                            selector.unregister(sock)
                for key, _ in selector.select(None if pause in (0, math.inf) else pause):
                    if key.fileobj == self._wake_r:
                        self._drain_wakes()
                    else:
                        self._accept(key.fileobj)
        finally:
            if previous_wakeup is not None:
                signal.set_wakeup_fd(previous_wakeup)  # before close() closes our descriptor
            selector.close()
            self.close()

    def _accept_pause(self) -> float:
        """0 to accept now, else how long to wait before trying (math.inf: until a connection ends)."""
        if self.max_connections is not None and len(self._connections) >= self.max_connections:
            times = self._throttle.due("connection_limit")
            if times:
                self._event("connection_limit", max_connections=self.max_connections, times=times)
            return math.inf
        return max(self._accept_retry_at - time.monotonic(), 0)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in _ACCEPT_RESOURCES:
                # The connection stays in the backlog: try again later (or when one ends), not at once.
                self._accept_retry_at = time.monotonic() + ACCEPT_RETRY
                times = self._throttle.due("accept_failed")
                if times:
                    self._event("accept_failed", error=exc.strerror, errno=errno.errorcode.get(exc.errno),
                                retry_in=ACCEPT_RETRY, times=times)
                return
            raise
        self._accept_retry_at = 0.0
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the spec recommends
            peer = f"{addr[0]}:{addr[1]}"
        else:
            peer = "unix"
        self.serve_socket(sock, handshake="newstyle", peer=peer)

    def _wake(self) -> None:
        """Make serve_forever look again (a connection ended, or the server is stopping)."""
        with self._lock:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass  # full: a wake is already pending

    def _drain_wakes(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    def _budget_spent(self, budget: Budget) -> None:
        times = self._throttle.due("inflight_limit")
        if times:
            self._event("inflight_limit", max_inflight_bytes=budget.max_bytes, held_bytes=budget.held_bytes,
                        waiting=budget.waiting, times=times)

    def _internal_error(self, conn_id: int, text: str) -> None:
        times = self._throttle.due("internal_error")
        if times:
            self._event("internal_error", id=conn_id, error=text, times=times)

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
                handle.connection = Connection(
                    sock, session, gate=self.gate, pool=self.pool, workers=self.workers,
                    max_inflight_bytes=self.max_inflight_bytes, shared_budget=self.budget,
                    on_internal_error=lambda text, conn_id=handle.id: self._internal_error(conn_id, text))
                if self._stopping.is_set():
                    handle.connection.stop()  # shutdown() ran before the connection was there to stop
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
        except Exception as exc:  # a bug: this connection ends, the server goes on
            reason = f"internal error: {type(exc).__name__}: {exc}: hung up"
            self._internal_error(handle.id, f"serving the connection: {type(exc).__name__}: {exc}")
        finally:
            try:
                sock.close()
            except OSError:
                pass
            handle.end_reason = reason
            with self._lock:
                self._connections.pop(handle.id, None)
            self._wake()  # serve_forever may be waiting for a free slot or descriptor
            fields = {"id": handle.id, "reason": reason}
            if handle.connection is not None:
                stats = handle.connection.stats
                fields.update(requests=stats.requests, bytes_read=stats.bytes_read,
                              bytes_written=stats.bytes_written, errors=stats.errors)
                if handle.connection.internal_errors:
                    fields["internal_errors"] = handle.connection.internal_errors[:10]
                    fields["internal_error_count"] = handle.connection.internal_error_count
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
        self._wake()
        self.gate.close()
        self.budget.close()
        for handle in self.connections():
            _shut(handle.sock, socket.SHUT_RD)
            if handle.connection is not None:
                handle.connection.stop()

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
        with self._lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
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
