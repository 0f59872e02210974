"""Channels, keep-alives and stall detection, piece by piece (the fault matrix runs them end to end).

- a read or a write that makes no progress for the stall timeout is PeerStalled; progress resets it;
- a Heartbeat keeps an idle channel alive, and stays out of the middle of a message;
- the receiver ignores KEEPALIVE frames and answers with its own while idle, and a sender that stops
  sending even those is reported as stalled, with the target marked incomplete;
- the sender's link ignores KEEPALIVE messages and reports a receiver that stops sending them.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from blocktrack.errors import PeerStalled
from blocktrack.migrate.link import ReceiverLink
from blocktrack.migrate.savedstate import TargetState, state_root, target_folder
from blocktrack.migrate.scenario import sha256, start_receiver
from blocktrack.transport import Heartbeat, PipeChannel, SocketChannel
from blocktrack.wire import control as C
from tests.conftest import MiB, write_image


def _pair(timeout: float):
    a, b = socket.socketpair()
    return SocketChannel(a, "a", stall_timeout=timeout), SocketChannel(b, "b", stall_timeout=timeout)


def test_read_stall_is_detected_in_time():
    a, b = _pair(0.5)
    started = time.monotonic()
    with pytest.raises(PeerStalled, match="nothing received for 0.5 s"):
        a.recv_into(bytearray(10))
    assert 0.4 < time.monotonic() - started < 3
    a.close(), b.close()


def test_write_stall_is_detected_and_progress_resets_it():
    a, b = _pair(0.5)
    with pytest.raises(PeerStalled, match="nothing could be sent"):
        a.sendall(bytes(64 * MiB))  # b never reads
    a.close(), b.close()

    # A slow reader that keeps taking a little is not a stall, however long the whole send takes.
    a, b = _pair(0.5)
    got = bytearray()

    def slow_reader():
        while len(got) < 8 * MiB:
            time.sleep(0.05)
            got.extend(b.sock.recv(1 << 20))

    reader = threading.Thread(target=slow_reader)
    b.sock.setblocking(True)
    reader.start()
    a.sendall(bytes(8 * MiB))
    reader.join()
    assert len(got) == 8 * MiB
    a.close(), b.close()


def test_heartbeat_keeps_an_idle_channel_alive_and_never_splits_a_message():
    a, b = _pair(0.6)
    beat = Heartbeat(a, b"K", 0.2)
    try:
        deadline = time.monotonic() + 2
        seen = bytearray()
        while time.monotonic() < deadline:
            buf = bytearray(1 << 20)
            seen += buf[:b.recv_into(buf)]
        assert seen and set(seen) == {ord("K")}
        # While a long message is sent, no heartbeat lands inside it.
        message = b"M" * (4 * MiB)
        sender = threading.Thread(target=a.sendall, args=(message,))
        sender.start()
        received = bytearray()
        while received.count(b"M") < len(message):
            buf = bytearray(1 << 20)
            received += buf[:b.recv_into(buf)]
        sender.join()
        body = received.strip(b"K")
        assert body == message
    finally:
        beat.stop()
        a.close(), b.close()


def test_pipe_channel_stalls_and_restores_blocking_mode():
    r, w = os.pipe()
    channel = PipeChannel(r, w, "pipe", stall_timeout=0.3)
    channel.sendall(b"abc")
    buf = bytearray(3)
    assert channel.recv_into(buf) == 3 and buf == b"abc"
    with pytest.raises(PeerStalled):
        channel.recv_into(buf)
    channel.close()
    assert os.get_blocking(r) and os.get_blocking(w)
    os.close(r), os.close(w)


def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        assert piece, "connection closed"
        data += piece
    return data


def test_receiver_ignores_keepalives_answers_with_its_own_and_finds_a_stalled_sender(tmp_path):
    target = write_image(tmp_path / "dst.img", 2 * MiB, seed=40)
    before = sha256(target)
    state = tmp_path / "state"
    receiver, port = start_receiver([f"d={target}"], state, "--stall-timeout", "1")
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(C.encode_hello(C.Hello(os.urandom(16), "d", 2 * MiB, MiB)))
    kind, length = C.decode_reply_header(_recv_exact(sock, C.REPLY.size), 1 << 20)
    assert kind == C.ACCEPT
    _recv_exact(sock, length)
    # 2.5 s of keep-alives only, every 0.3 s: longer than the receiver's stall timeout, no stall.
    replies = bytearray()
    sock.settimeout(0.3)
    for _ in range(8):
        sock.sendall(C.frame_header(C.FRAME_KEEPALIVE, 0))
        try:
            replies += sock.recv(4096)
        except socket.timeout:
            pass
    assert receiver.proc.poll() is None, receiver.stderr
    assert replies and len(replies) % C.REPLY.size == 0
    assert all(C.decode_reply_header(bytes(replies[i:i + C.REPLY.size]), 0)[0] == C.KEEPALIVE
               for i in range(0, len(replies), C.REPLY.size))
    # Then silence: the receiver gives up within about its stall timeout.
    silent_at = time.monotonic()
    assert receiver.wait() == 5
    assert time.monotonic() - silent_at < 10
    assert "stalled" in receiver.stderr and "--stall-timeout" in receiver.stderr
    status = TargetState.load(target_folder(state_root(str(state)), str(target))).status
    assert status == "interrupted" and sha256(target) == before
    sock.close()


def test_link_ignores_keepalives_and_reports_a_stalled_receiver():
    ours, theirs = socket.socketpair()
    hello = C.Hello(os.urandom(16), "d", 3 * MiB, MiB)

    def fake_receiver():
        _recv_exact(theirs, len(C.encode_hello(hello)))
        theirs.sendall(C.encode_accept(3 * MiB, 3, []))
        for _ in range(6):  # 1.8 s of keep-alives, then silence
            theirs.sendall(C.reply(C.KEEPALIVE))
            time.sleep(0.3)

    thread = threading.Thread(target=fake_receiver, daemon=True)
    thread.start()
    link = ReceiverLink(SocketChannel(ours, "fake", stall_timeout=1.0, peer="the receiver"), hello)
    try:
        time.sleep(1.5)
        link.check()  # keep-alives only: alive
        deadline = time.monotonic() + 10
        while link.error is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert isinstance(link.error, PeerStalled)
        with pytest.raises(PeerStalled):
            link.check()
    finally:
        link.close()
        thread.join(5)
        theirs.close()
