"""No early finish (ARCHITECTURE.md, invariant 2), from both ends of a live migration.

QEMU 7.2's block migration, with nothing dirty and a fast link, reports "completed" after a few
percent of a 2 GiB disk (FIELD-NOTES.md). Our sender must send every chunk before it cuts over, and
our receiver must refuse to call a target complete when a sender stopped early.
"""

from __future__ import annotations

import os
import socket

from blocktrack.migrate.scenario import live_migration, start_receiver
from blocktrack.wire import StreamWriter
from blocktrack.wire import control as C
from tests.conftest import MiB, blank_image

GiB = 1 << 30


def test_idle_two_gib_sparse_device_is_sent_whole_before_cutover(tmp_path):
    source = blank_image(tmp_path / "src.img", 2 * GiB)
    target = blank_image(tmp_path / "dst.img", 2 * GiB)
    # The tool's own full verification compares all 2048 chunks of the frozen source and the target
    # (XXH3; sha256 or cmp of 2 x 2 GiB would cost this test more than the migration does).
    result = live_migration(source, target, tmp_path, writer_rate=0, rate_limit=None, compare=False,
                            extra=["--verify", "full"])
    summary, received = result.summary, result.receiver_summary
    assert result.migrate_code == 0 and summary is not None, result.migrate_stderr
    assert summary["result"] == "verified" and summary["chunks_verified"] == 2048
    # Every one of the 2048 chunks went over the wire (as ZERO_BLOCK records: the source is sparse)
    # before the cutover, and the receiver counted them in.
    assert summary["chunks_sent"] == 2048 and summary["zero_chunks"] == 2048
    assert summary["sent_bytes"] == 2 * GiB
    assert received["chunks"] == 2048 and received["chunks_held"] == received["target_chunks"] == 2048
    phases = [e["phase"] for e in result.events if e.get("event") == "phase"]
    assert phases.index("cutover") > phases.index("bulk")
    bulk_progress = [e for e in result.events if e.get("event") == "progress" and e.get("phase") == "bulk"]
    assert all(e["percent"] <= 100 for e in bulk_progress)
    assert received["chunks_verified"] == 2048 and received["verify"] == "full"


def _recv_message(sock) -> tuple[int, bytes]:
    head = _recv_exact(sock, C.REPLY.size)
    kind, length = C.decode_reply_header(head, 1 << 20)
    return kind, _recv_exact(sock, length)


def _recv_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        assert piece, f"connection closed after {len(data)} of {n} bytes"
        data += piece
    return data


class _FrameSink:
    def __init__(self, sock):
        self.sock = sock

    def write(self, buf) -> None:
        data = bytes(buf)
        self.sock.sendall(C.frame_header(C.FRAME_DATA, len(data)) + data)


def test_receiver_refuses_a_sender_that_stops_early(tmp_path):
    """A well-formed migration stream that carries 2 of 16 chunks and ends: QEMU 7.2's early finish."""
    target = blank_image(tmp_path / "dst.img", 16 * MiB)
    receiver, port = start_receiver([f"disk={target}"], tmp_path / "state")
    hello = C.Hello(os.urandom(16), "disk", 16 * MiB, MiB)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(C.encode_hello(hello))
        kind, body = _recv_message(sock)
        assert kind == C.ACCEPT and C.decode_accept(body, 16).held == []
        writer = StreamWriter(_FrameSink(sock))
        writer.start()
        writer.block("disk", 0, b"\x11" * MiB)
        writer.block("disk", 2048, b"\x22" * MiB)
        writer.progress(100)
        writer.finish()
        sock.sendall(C.frame_header(C.FRAME_END, 0))
        kinds = []
        while True:
            kind, body = _recv_message(sock)
            kinds.append(kind)
            if kind != C.ACK:
                break
        assert kind == C.ERROR, kinds
        assert "without 14 of 16 chunks" in C.decode_text(body)
    assert receiver.wait() == 3
    assert "early finish" in receiver.stderr and "Traceback" not in receiver.stderr
    assert not receiver.named("summary")
