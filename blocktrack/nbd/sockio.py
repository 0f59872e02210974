"""Whole-message socket I/O for the NBD server: exact receives into caller buffers, gathered sends.

Both release the GIL in the system call (``recv_into``, ``sendmsg``) and copy nothing in Python: a
request's payload lands directly in the buffer that is then written to the device, and a reply's
header and data leave in one ``sendmsg`` without being joined first.
"""

from __future__ import annotations

import socket


class PeerClosed(Exception):
    """The peer closed the connection; ``partial`` when it did so in the middle of a message."""

    def __init__(self, partial: bool, what: str = "message"):
        self.partial = partial
        super().__init__(f"connection closed in the middle of a {what}" if partial else "connection closed")


class ProtocolViolation(Exception):
    """The peer broke a rule the protocol makes mandatory; the server hangs up (hard disconnect)."""


def recv_exact(sock: socket.socket, view: memoryview, what: str = "message") -> None:
    """Fill ``view`` from ``sock``; raise PeerClosed on end of stream (partial when bytes came)."""
    total = len(view)
    done = 0
    while done < total:
        try:
            n = sock.recv_into(view[done:], total - done, socket.MSG_WAITALL)
        except InterruptedError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            n = 0
        if n == 0:
            raise PeerClosed(done > 0, what)
        done += n


def discard(sock: socket.socket, length: int, scratch: memoryview, what: str = "payload") -> None:
    """Read and drop ``length`` bytes (the payload of a request we refuse), through ``scratch``."""
    while length > 0:
        piece = min(length, len(scratch))
        recv_exact(sock, scratch[:piece], what)
        length -= piece


def send_all(sock: socket.socket, buffers: list) -> None:
    """Send every byte of ``buffers`` in order (one sendmsg when the socket takes it all)."""
    views = [memoryview(b) for b in buffers]
    views = [v if v.format == "B" and v.ndim == 1 else v.cast("B") for v in views if v.nbytes]
    while views:
        try:
            sent = sock.sendmsg(views)
        except InterruptedError:
            continue
        while sent:
            head = views[0]
            if sent >= len(head):
                sent -= len(head)
                views.pop(0)
            else:
                views[0] = head[sent:]
                sent = 0
