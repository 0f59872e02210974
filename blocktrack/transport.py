"""Byte transports for migration streams: files, pipes (stdin/stdout), TCP and TLS sockets.

A *sink* has ``write(buf)`` that writes every byte or raises, and ``close()``. A *source* has
``readinto(buf) -> int`` with RawIOBase meaning (a short count is allowed, 0 is end of stream) and
``close()``. The wire layer (blocktrack.wire) reads and writes through exactly these two methods, so it
never knows whether it talks to a pipe or a socket. Network connections are Channels (below), both a
sink and a source, made only by blocktrack.secure, which authenticates them first: this module opens
no TCP connection of its own.

Why not plain file objects: a broken pipe or a reset connection must become a PeerError that names the
peer, and pipes get an 8 MiB kernel buffer where allowed (F_SETPIPE_SZ) so a 1 MiB chunk does not cost
sixteen context switches and the two ends do not run in lock step.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import ssl
import stat
import sys
import threading
import time

from blocktrack.errors import BlocktrackError, PeerError, PeerStalled, UsageError

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# Several chunks of slack between sender and receiver; root may exceed pipe-max-size (1 MiB by
# default), others fall back to it.
PIPE_BUFFER_SIZES = (8 << 20, 1 << 20)
LISTEN_BACKLOG = 128


def parse_host_port(text: str, *, default_host: str | None = None) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``[V6ADDR]:PORT`` or (with a default host) ``:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise UsageError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        if default_host is None:
            raise UsageError(f"expected HOST:PORT, got {text!r}")
        host = default_host
    try:
        port_number = int(port)
    except ValueError:
        raise UsageError(f"port must be a number in {text!r}") from None
    if not 0 <= port_number <= 65535:
        raise UsageError(f"port out of range in {text!r}")
    return host, port_number


def _grow_pipe(fd: int) -> None:
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
    except OSError:
        return
    for size in PIPE_BUFFER_SIZES:
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, size)
            return
        except OSError:
            continue  # a smaller pipe only costs speed


class FdSink:
    """Writes to a file descriptor (a file, a pipe, stdout)."""

    def __init__(self, fd: int, name: str, *, owned: bool):
        self.fd = fd
        self.name = name
        self._owned = owned
        _grow_pipe(fd)

    def write(self, buf) -> None:
        view = memoryview(buf).cast("B")
        while view:
            try:
                written = os.write(self.fd, view)
            except InterruptedError:
                continue
            except BrokenPipeError:
                raise PeerError(f"{self.name}: the reading end went away (broken pipe)") from None
            view = view[written:]

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class FdSource:
    """Reads from a file descriptor (a file, a pipe, stdin)."""

    def __init__(self, fd: int, name: str, *, owned: bool):
        self.fd = fd
        self.name = name
        self._owned = owned
        _grow_pipe(fd)

    def readinto(self, buf) -> int:
        while True:
            try:
                return os.readv(self.fd, [buf])
            except InterruptedError:
                continue

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class Listener:
    """A listening TCP socket for one sender (secure.accept_channel accepts and authenticates the
    connections that arrive, side by side, until one authenticates).

    With no host (``:PORT``) it binds to 127.0.0.1: listening beyond this machine is asked for by
    naming an address, never a default."""

    def __init__(self, address: str):
        host, port = parse_host_port(address, default_host="127.0.0.1")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _, sockaddr = infos[0]
            self.sock = socket.socket(family, kind, proto)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(sockaddr)
            # Room for a burst of connections while handshakes run: a backlog of 1 let a few idle
            # connections fill the queue and the sender's SYNs be dropped.
            self.sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            raise UsageError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        self.host, self.port = self.sock.getsockname()[:2]


def open_sink(output: str) -> FdSink:
    """A file path or ``-`` for stdout. Files are created (mode 0600) and truncated."""
    if output == "-":
        return FdSink(sys.stdout.fileno(), "stdout", owned=False)
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot create {output}: {exc.strerror}") from None
    return FdSink(fd, output, owned=True)


def open_source(path: str) -> FdSource:
    """A file path or ``-`` for stdin."""
    if path == "-":
        return FdSource(sys.stdin.fileno(), "stdin", owned=False)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot open {path}: {exc.strerror}") from None
    return FdSource(fd, path, owned=True)


class RateLimitedSink:
    """Caps the average write rate of another sink (token bucket with a one-second burst)."""

    def __init__(self, inner, bytes_per_second: int):
        if bytes_per_second <= 0:
            raise UsageError("--rate-limit must be positive")
        self.inner = inner
        self.rate = float(bytes_per_second)
        self._allowance = self.rate
        self._last = time.monotonic()

    @property
    def name(self) -> str:
        return self.inner.name

    def write(self, buf) -> None:
        size = memoryview(buf).nbytes
        now = time.monotonic()
        self._allowance = min(self.rate, self._allowance + (now - self._last) * self.rate)
        self._last = now
        self._allowance -= size
        if self._allowance < 0:
            time.sleep(-self._allowance / self.rate)
        self.inner.write(buf)

    def close(self) -> None:
        self.inner.close()


# -- duplex channels with stall detection ------------------------------------------------------------
#
# A live migration talks both ways at once (the sender's main thread writes frames while a reader
# thread takes ACKs; the receiver reads frames while a heartbeat thread may answer), over a plain
# TCP socket, a TLS socket, or the two pipes of an ssh process. A Channel hides which, and adds what
# a bare socket lacks:
#
# * stall detection: every wait (for a byte to read, for room to write) is a poll() bounded by
#   ``stall_timeout``; a wait that sees no progress for that long raises PeerStalled. Progress resets
#   it, so a slow but moving peer is never cut (Python's own socket timeouts bound a whole sendall(),
#   which would cut a slow link);
# * one SSL call at a time: OpenSSL forbids using one SSL object from two threads at once, so the fd
#   is non-blocking, each SSL call is made under a lock, and the waiting (poll) happens outside it;
# * whole messages: ``sendall`` holds a send lock, so a heartbeat never lands inside a frame, and
#   ``send_if_idle`` lets the heartbeat skip its turn while real data flows.

_POLL_IN = select.POLLIN | select.POLLPRI
_POLL_OUT = select.POLLOUT
_SEND_PIECE = 256 << 10  # one SSL_write: it must complete within the stall timeout


class Channel:
    """Base of SocketChannel and PipeChannel: the waiting, locking and idle bookkeeping."""

    def __init__(self, name: str, stall_timeout: float | None):
        self.name = name
        self.stall_timeout = stall_timeout
        self.last_sent = time.monotonic()
        self.last_received = self.opened = time.monotonic()
        self._send_lock = threading.Lock()
        self._io_lock = threading.Lock()  # one SSL call at a time (harmless for plain fds)
        self.closed = False

    # subclasses: _read_fd, _write_fd, _recv_some(view) -> int, _send_some(views) -> int
    # (both raise _WantRead / _WantWrite when they would block)

    def end_output(self) -> None:
        """No more bytes from this end: the peer reads an end of stream, and can still answer (see
        SocketChannel._end_output for why a sender must not simply close)."""
        # Not in the middle of someone's message, unless that send is stuck (a stalled peer).
        locked = self._send_lock.acquire(timeout=2)
        try:
            self._end_output()
        finally:
            if locked:
                self._send_lock.release()

    def _end_output(self) -> None:
        pass  # no such signal apart from closing (stdin/stdout of a receiver)

    def drain(self) -> None:
        """After end_output: read and drop what the peer still sends until it closes (or stalls)."""
        buf = bytearray(65536)
        try:
            while self.recv_into(buf):
                pass
        except BlocktrackError:
            pass

    def _wait(self, fd: int, events: int, what: str) -> None:
        poller = select.poll()
        poller.register(fd, events)
        timeout_ms = None if self.stall_timeout is None else int(self.stall_timeout * 1000)
        while True:
            try:
                ready = poller.poll(timeout_ms)
            except InterruptedError:
                continue
            if ready:
                return
            raise PeerStalled(f"{self.name}: {what} for {self.stall_timeout:g} s (--stall-timeout): the peer "
                              "or the network between us stalled")

    def recv_into(self, buf) -> int:
        """Read some bytes (RawIOBase meaning: 0 is the end of the stream)."""
        view = memoryview(buf).cast("B")
        if not view.nbytes:
            return 0
        while True:
            try:
                with self._io_lock:
                    got = self._recv_some(view)
                self.last_received = time.monotonic()
                return got
            except _WantRead:
                self._wait(self._read_fd, _POLL_IN, "nothing received")
            except _WantWrite:
                self._wait(self._write_fd, _POLL_OUT, "nothing could be sent")

    readinto = recv_into

    def sendall(self, *buffers) -> None:
        """Send every byte of ``buffers`` as one message (no other sender interleaves)."""
        views = [memoryview(b).cast("B") for b in buffers]
        views = [v for v in views if v.nbytes]
        with self._send_lock:
            self._send_locked(views)

    write = sendall

    def send_if_idle(self, data: bytes, idle: float) -> bool:
        """Send ``data`` unless a message is being sent or one was sent in the last ``idle`` seconds."""
        if not self._send_lock.acquire(blocking=False):
            return False
        try:
            if time.monotonic() - self.last_sent < idle:
                return False
            self._send_locked([memoryview(data)])
            return True
        finally:
            self._send_lock.release()

    def _send_locked(self, views) -> None:
        while views:
            try:
                with self._io_lock:
                    sent = self._send_some(views)
            except _WantWrite:
                self._wait(self._write_fd, _POLL_OUT, "nothing could be sent")
                continue
            except _WantRead:
                self._wait(self._read_fd, _POLL_IN, "nothing received")
                continue
            self.last_sent = time.monotonic()
            while views and sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]


class _WantRead(Exception):
    pass


class _WantWrite(Exception):
    pass


class SocketChannel(Channel):
    """A connected TCP socket, plain or ssl.SSLSocket (already past its TLS handshake)."""

    def __init__(self, sock: socket.socket, name: str, *, stall_timeout: float | None, peer: str = "the peer"):
        super().__init__(name, stall_timeout)
        self.sock = sock
        self.peer = peer
        self.tls = isinstance(sock, ssl.SSLSocket)
        sock.setblocking(False)
        self._read_fd = self._write_fd = sock.fileno()

    def _recv_some(self, view) -> int:
        try:
            return self.sock.recv_into(view)
        except (BlockingIOError, ssl.SSLWantReadError):
            raise _WantRead from None
        except ssl.SSLWantWriteError:
            raise _WantWrite from None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0  # the framing above tells a clean end from a cut one
        except (ConnectionResetError, ConnectionAbortedError, ssl.SSLError, OSError) as exc:
            if self.closed:
                return 0
            raise PeerError(f"{self.name}: connection reset by {self.peer} ({_why(exc)}){self._hint()}") from None

    def _hint(self) -> str:
        # TLS 1.3 finishes the client's handshake before the server has checked the client's
        # certificate: a refusal shows up as the first read or write failing.
        if self.tls and self.last_received == self.opened:
            return "; did it refuse our certificate or key?"
        return ""

    def _send_some(self, views) -> int:
        try:
            if self.tls:
                return self.sock.send(views[0][:_SEND_PIECE])
            return self.sock.sendmsg(views[:64])
        except (BlockingIOError, ssl.SSLWantWriteError):
            raise _WantWrite from None
        except ssl.SSLWantReadError:
            raise _WantRead from None
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, ssl.SSLError, OSError) as exc:
            raise PeerError(f"{self.name}: connection lost while sending to {self.peer} ({_why(exc)})"
                            f"{self._hint()}") from None

    def _end_output(self) -> None:
        """Send FIN after every byte sent so far; reading goes on (the peer's last words, its close).

        Closing a socket that still has unread input sends RST, and a RST makes the peer's kernel drop
        what it had not yet delivered: the tail of our stream, or our last message. TLS 1.3 servers
        send session tickets nobody reads, so a sender must end its output, let the peer finish and
        close, and only then close (``drain``). The TLS session is dropped without close_notify: our
        own framing says where the stream ends, so a cut is never taken for an end."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def shutdown(self) -> None:
        """Wake a thread waiting on this channel (it then sees the end); idempotent."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        self.sock.close()


class PipeChannel(Channel):
    """Two file descriptors: read from one, write to the other (stdin/stdout, an ssh process's pipes).

    They are made non-blocking while the channel is open and put back at close: stdout may be the
    terminal or a pipe another process shares."""

    def __init__(self, read_fd: int, write_fd: int, name: str, *, stall_timeout: float | None,
                 peer: str = "the peer"):
        super().__init__(name, stall_timeout)
        self._read_fd, self._write_fd = read_fd, write_fd
        self.peer = peer
        self._blocking = {fd: os.get_blocking(fd) for fd in {read_fd, write_fd}}
        for fd in self._blocking:
            os.set_blocking(fd, False)

    def _recv_some(self, view) -> int:
        try:
            return os.readv(self._read_fd, [view])
        except BlockingIOError:
            raise _WantRead from None
        except OSError as exc:
            if self.closed:
                return 0
            raise PeerError(f"{self.name}: reading from {self.peer} failed ({_why(exc)})") from None

    def _send_some(self, views) -> int:
        try:
            return os.writev(self._write_fd, views[:64])
        except BlockingIOError:
            raise _WantWrite from None
        except OSError as exc:  # EPIPE: the reading end went away
            raise PeerError(f"{self.name}: {self.peer} went away ({_why(exc)})") from None

    def shutdown(self) -> None:
        self.closed = True

    def restore(self) -> None:
        for fd, blocking in self._blocking.items():
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass

    def close(self) -> None:
        self.shutdown()
        self.restore()


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class Heartbeat:
    """Sends ``message`` on ``channel`` whenever nothing else was sent for ``interval`` seconds.

    The far end's stall timer then only fires when this end is really gone (or the network is), not
    while this end is busy elsewhere (digesting a target, waiting for writers). It stops quietly on
    the first send error: the main path reports the failure."""

    def __init__(self, channel: Channel, message: bytes, interval: float):
        self.channel = channel
        self.message = message
        self.interval = max(0.05, interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval / 2):
            try:
                self.channel.send_if_idle(self.message, self.interval)
            except BlocktrackError:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(self.interval + 1)


def set_keepalive(sock: socket.socket, stall_timeout: float | None) -> None:
    """TCP keep-alives and a user timeout that give up on a dead host within ``stall_timeout``.

    The application heartbeat (Heartbeat) finds a stalled process or proxy; these find a host or a
    path that is gone while the kernel still holds unacknowledged data, which no read would notice."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if stall_timeout:
            idle = max(1, int(stall_timeout / 3))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(stall_timeout / 9)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            user_timeout = getattr(socket, "TCP_USER_TIMEOUT", 18)
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, int(stall_timeout * 1000))
    except OSError:
        pass  # not a TCP socket (a socketpair in tests), or an old kernel: the heartbeat still works
