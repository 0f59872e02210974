"""The control socket of a running ``blocktrack migrate``: how ``blocktrack release`` reaches it.

A Unix socket in the migration's state folder (mode 0600 in a 0700 folder: root's business only),
served by a thread of the migrate process; one JSON request and one JSON answer per connection
(layout in blocktrack/wire/control.py). Unix socket paths are limited to 107 bytes, and state
folders can be deep, so both ends reach a long path through ``/proc/self/fd/<dir fd>/<name>``.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from blocktrack.errors import BlocktrackError, PeerError, StreamError, UsageError
from blocktrack.wire.control import MAX_CONTROL_LINE, decode_control, encode_control

_SUN_PATH_MAX = 107


@contextmanager
def _short_path(path: Path):
    """A path to ``path`` short enough for sockaddr_un."""
    if len(os.fsencode(str(path))) <= _SUN_PATH_MAX:
        yield str(path)
        return
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{path.name}"
    finally:
        os.close(dfd)


class ControlServer:
    """Answer requests on a Unix socket with ``handler(request) -> answer`` until close()."""

    def __init__(self, path: Path, handler: Callable[[dict], dict]):
        self.path = Path(path)
        self.handler = handler
        self._stop = threading.Event()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _short_path(self.path) as where:
                self._sock.bind(where)
            os.chmod(self.path, 0o600)
            self._sock.listen(8)
        except OSError as exc:
            self._sock.close()
            raise UsageError(f"cannot create the control socket {self.path}: {exc.strerror or exc}") from None
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, name="migrate-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    line = _read_line(conn)
                    try:
                        answer = self.handler(decode_control(line))
                    except BlocktrackError as exc:
                        answer = {"ok": False, "error": str(exc)}
                    except Exception as exc:  # a bug: answer rather than leave the client waiting
                        answer = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
                    conn.sendall(encode_control(answer))
                except (OSError, StreamError):
                    continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _read_line(conn: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        piece = conn.recv(4096)
        if not piece:
            break
        data += piece
        if len(data) > MAX_CONTROL_LINE:
            raise StreamError("control message too long")
    return bytes(data)


def request(path: Path, message: dict, *, timeout: float = 120.0) -> dict:
    """Send one request to a running migration; raise PeerError when none answers."""
    path = Path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _short_path(path) as where:
            sock.connect(where)
        sock.sendall(encode_control(message))
        line = _read_line(sock)
    except FileNotFoundError:
        raise PeerError(f"no control socket at {path}: the blocktrack migrate that owns it is not running") from None
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            raise PeerError(f"nothing answers on {path}: the blocktrack migrate that owns it is not running") from None
        raise PeerError(f"control socket {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if not line:
        raise PeerError(f"the migration behind {path} closed the control connection without an answer")
    return decode_control(line)
