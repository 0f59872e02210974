"""Byte transports for migration streams: files, pipes (stdin/stdout) and TCP.

A *sink* has ``write(buf)`` that writes every byte or raises, and ``close()``. A *source* has
``readinto(buf) -> int`` with RawIOBase meaning (a short count is allowed, 0 is end of stream) and
``close()``. The wire layer (blocktrack.wire) reads and writes through exactly these two methods, so it
never knows whether it talks to a pipe or a socket.

Why not plain file objects: a broken pipe or a reset connection must become a PeerError that names the
peer, and pipes get an 8 MiB kernel buffer where allowed (F_SETPIPE_SZ) so a 1 MiB chunk does not cost
sixteen context switches and the two ends do not run in lock step.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import sys
import time

from blocktrack.errors import PeerError, UsageError

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# Several chunks of slack between sender and receiver; root may exceed pipe-max-size (1 MiB by
# default), others fall back to it.
PIPE_BUFFER_SIZES = (8 << 20, 1 << 20)


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


class SocketSink:
    def __init__(self, sock: socket.socket, name: str):
        self.sock = sock
        self.name = name

    def write(self, buf) -> None:
        try:
            self.sock.sendall(buf)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerError(f"{self.name}: connection lost ({exc.strerror})") from None

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()


class SocketSource:
    def __init__(self, sock: socket.socket, name: str):
        self.sock = sock
        self.name = name

    def readinto(self, buf) -> int:
        try:
            return self.sock.recv_into(buf)
        except ConnectionResetError:
            raise PeerError(f"{self.name}: connection reset by the sender") from None

    def close(self) -> None:
        self.sock.close()


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


def connect(address: str, *, timeout: float = 30.0) -> SocketSink:
    host, port = parse_host_port(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise PeerError(f"cannot connect to {address}: {exc.strerror or exc}") from None
    sock.settimeout(None)
    _tune(sock)
    return SocketSink(sock, f"tcp:{address}")


class Listener:
    """A listening TCP socket that hands out one accepted connection."""

    def __init__(self, address: str):
        host, port = parse_host_port(address, default_host="127.0.0.1")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _, sockaddr = infos[0]
            self.sock = socket.socket(family, kind, proto)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(sockaddr)
            self.sock.listen(1)
        except OSError as exc:
            raise UsageError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        self.host, self.port = self.sock.getsockname()[:2]

    def accept(self) -> SocketSource:
        conn, peer = self.sock.accept()
        _tune(conn)
        self.sock.close()
        return SocketSource(conn, f"tcp:{peer[0]}:{peer[1]}")


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

