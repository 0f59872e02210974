"""The migration handshake and control messages, the receiver's refusals, the intent journal, the CLI's errors."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from blocktrack.commands.migrate import wire_name
from blocktrack.errors import StreamError
from blocktrack.migrate.nbd_source import IntentJournal
from blocktrack.migrate.scenario import sha256, start_receiver
from blocktrack.wire import control as C
from blocktrack.wire.layout import classify_word
from tests.conftest import MiB, run_blocktrack, write_image


def test_hello_round_trip_and_magic_is_no_stream():
    hello = C.Hello(bytes(range(16)), "vg0/data", 5 * MiB + 512, MiB, C.FLAG_RESUME | C.FLAG_VERIFY_FULL, 3)
    raw = C.encode_hello(hello)
    head, name_len = C.decode_hello_head(raw[:C.HELLO.size])
    assert C.decode_hello_name(head, raw[C.HELLO.size:C.HELLO.size + name_len]) == hello
    assert hello.resume and hello.verify_full and hello.nchunks == 6
    # Neither a QEMU stream ("QEVM") nor a bare block stream can start with the handshake's magic.
    assert raw[:4] != b"QEVM"
    with pytest.raises(StreamError, match="unknown flag bits"):
        classify_word(struct.unpack(">Q", C.HELLO_MAGIC)[0], 0)
    with pytest.raises(StreamError, match="not a blocktrack migration"):
        C.decode_hello_head(b"QEVM" + raw[4:C.HELLO.size])


def test_receiver_messages_round_trip():
    kind, length = C.decode_reply_header(C.encode_ack(10, 5)[:C.REPLY.size], 0)
    assert (kind, length) == (C.ACK, 16) and C.decode_ack(C.encode_ack(10, 5)[C.REPLY.size:]) == (10, 5)
    accept = C.encode_accept(8 * MiB, 20, [[0, 2], [7, 7], [19, 19]])
    assert C.decode_accept(accept[C.REPLY.size:], 20).held == [0, 1, 2, 7, 19]
    digests = bytes(range(20)) * 16  # 20 chunks x 16 bytes, in chunk order
    result = C.decode_result(C.encode_result(C.SCOPE_MAP, 4, 20, 20, digests)[C.REPLY.size:], 20)
    assert result.digests == digests and result.scope == C.SCOPE_MAP and result.chunks_held == 20
    assert result.digest(3) == digests[48:64]
    reason, message = C.decode_refuse(C.encode_refuse(C.REFUSE_SIZE, "too small")[C.REPLY.size:])
    assert (reason, message) == (C.REFUSE_SIZE, "too small")
    verdict = C.encode_verdict(C.VERDICT_MISMATCH, "x" * 10000)
    kind, length = C.decode_frame_header(verdict[:C.FRAME.size], 0)
    assert kind == C.FRAME_VERDICT and length == C.MAX_MESSAGE + 1
    assert C.decode_verdict(verdict[C.FRAME.size:])[0] == C.VERDICT_MISMATCH
    with pytest.raises(StreamError):
        C.decode_reply_header(b"XXXX" + bytes(5), 100)
    with pytest.raises(StreamError):
        C.decode_reply_header(C.REPLY.pack(C.REPLY_MAGIC, C.ERROR, C.MAX_MESSAGE + 1), 100)
    with pytest.raises(StreamError):
        C.decode_frame_header(C.FRAME.pack(C.FRAME_DATA, C.MAX_DATA_FRAME + 1), 0)
    with pytest.raises(ValueError):   # a map of the wrong size is never sent
        C.encode_result(C.SCOPE_FULL, 1, 1, 2, b"c" * 16)
    with pytest.raises(StreamError, match="expected 3"):   # a map for another device
        C.decode_result(C.encode_result(C.SCOPE_FULL, 1, 1, 2, b"c" * 32)[C.REPLY.size:], 3)
    with pytest.raises(StreamError, match="has 42 bytes"):   # cut short
        C.decode_result(C.encode_result(C.SCOPE_FULL, 1, 1, 2, b"c" * 32)[C.REPLY.size:][:42])
    with pytest.raises(StreamError, match="scope"):   # version 2's final-part scope is retired
        C.decode_result(C.encode_result(1, 1, 1, 2, b"c" * 32)[C.REPLY.size:])


def _handshake(port: int, hello: C.Hello) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(C.encode_hello(hello))
        head = b""
        while len(head) < C.REPLY.size:
            piece = sock.recv(C.REPLY.size - len(head))
            assert piece, "closed without an answer"
            head += piece
        kind, length = C.decode_reply_header(head, 1 << 20)
        body = b""
        while len(body) < length:
            body += sock.recv(length - len(body))
        return kind, body


@pytest.mark.parametrize("case, reason, code, words", [
    ("unmapped", C.REFUSE_DEVICE, 2, "not mapped"),
    ("resume-unknown", C.REFUSE_MIGRATION, 2, "cannot resume"),
    ("version", C.REFUSE_VERSION, 3, "protocol version 9"),
])
def test_receiver_refuses_before_any_data(tmp_path, case, reason, code, words):
    target = write_image(tmp_path / "dst.img", 4 * MiB, seed=31)
    before = sha256(target)
    receiver, port = start_receiver([f"disk={target}"], tmp_path / "state")
    hello = C.Hello(os.urandom(16), "other" if case == "unmapped" else "disk", 4 * MiB, MiB,
                    C.FLAG_RESUME if case == "resume-unknown" else 0, 1, 9 if case == "version" else C.VERSION)
    kind, body = _handshake(port, hello)
    assert kind == C.REFUSE
    got_reason, message = C.decode_refuse(body)
    assert got_reason == reason and words in message
    assert receiver.wait() == code
    assert words in receiver.stderr and "Traceback" not in receiver.stderr
    assert sha256(target) == before


def test_intent_journal_generations(tmp_path):
    path = tmp_path / "journal"
    journal = IntentJournal(path, 8, MiB, fresh=True)
    assert journal.generation == 1
    first = journal.begin(MiB - 1, 2)  # touches chunks 0 and 1
    advanced = []
    waiter = threading.Thread(target=lambda: advanced.append(journal.advance()))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not advanced  # a change begun under generation 1 is still running
    journal.end(first)
    waiter.join(60)
    assert advanced == [1]
    journal.end(journal.begin(5 * MiB, 4096))  # generation 2
    assert list(journal.written_since(1)) == [5]
    assert list(journal.written_since(0)) == [0, 1, 5]
    journal.close()
    reopened = IntentJournal(path, 8, MiB, fresh=False)
    assert not reopened.reset and reopened.generation == 3 and list(reopened.written_since(1)) == [5]
    reopened.close()
    mismatched = IntentJournal(path, 9, MiB, fresh=False)  # another device size: never trusted
    assert mismatched.reset and list(mismatched.written_since(0)) == []
    mismatched.close()


@pytest.mark.parametrize("device, name", [
    ("/dev/vg0/data", "vg0/data"),
    ("/dev/mapper/vg--a-lv--b", "vg-a/lv-b"),
    ("/dev/loop3", "loop3"),
    ("/srv/images/disk.img", "disk.img"),
])
def test_wire_names(device, name):
    assert wire_name(device, None) == name


def test_cli_errors(tmp_path, monkeypatch):
    image = write_image(tmp_path / "src.img", MiB, seed=32)
    monkeypatch.setenv("BLOCKTRACK_STATE_DIR", str(tmp_path / "state"))
    resumed = run_blocktrack("migrate", image, "--to", "127.0.0.1:1", "--insecure", "--resume", text=True)
    assert resumed.returncode == 2 and "no migration" in resumed.stderr, resumed.stderr
    released = run_blocktrack("release", image, text=True)
    assert released.returncode == 2 and "no migration" in released.stderr
    refused = run_blocktrack("migrate", image, "--to", "127.0.0.1:1", "--insecure", "--serve-socket", tmp_path / "s.sock", text=True)
    assert refused.returncode == 5 and "cannot connect" in refused.stderr
    # Nothing moved: no migration to resume is left behind, so the same command may simply be retried.
    again = run_blocktrack("migrate", image, "--to", "127.0.0.1:1", "--insecure", "--serve-socket", tmp_path / "s.sock", text=True)
    assert again.returncode == 5 and "cannot connect" in again.stderr
    stream = tmp_path / "stream"
    stream.write_bytes(C.encode_hello(C.Hello(os.urandom(16), "d", MiB, MiB)))
    received = run_blocktrack("receive", "--device", f"d={image}", "--input", stream, text=True)
    assert received.returncode == 2 and "--listen" in received.stderr


def test_sender_waits_through_keepalives_before_accept():
    """A resuming receiver reads back what it holds before it answers HELLO, sending KEEPALIVEs: the
    sender's handshake waits through them for longer than its stall timeout (each keep-alive restarts
    the wait), and only a silence of that long is a stall."""
    from blocktrack.errors import PeerStalled
    from blocktrack.migrate.link import ReceiverLink
    from blocktrack.transport import SocketChannel

    hello = C.Hello(os.urandom(16), "disk", 4 * MiB, MiB, C.FLAG_RESUME, 2)
    stall = 2.0

    def receiver(sock, keepalives: int):
        with sock:
            got = b""
            while len(got) < len(C.encode_hello(hello)):
                got += sock.recv(4096)
            for _ in range(keepalives):
                sock.sendall(C.reply(C.KEEPALIVE))
                threading.Event().wait(stall / 10)   # a receiver's heartbeat pace: 10 per stall timeout
            if keepalives:
                sock.sendall(C.encode_accept(4 * MiB, 4, [[0, 1]]))
            sock.recv(1)   # silent until the sender closes

    for keepalives in (30, 0):
        listener = socket.create_server(("127.0.0.1", 0))
        server = threading.Thread(target=lambda: receiver(listener.accept()[0], keepalives), daemon=True)
        server.start()
        channel = SocketChannel(socket.create_connection(listener.getsockname()), "test receiver",
                                stall_timeout=stall)
        if keepalives:
            link = ReceiverLink(channel, hello)   # keep-alives for 3 x the stall timeout, then ACCEPT
            assert link.accept.held == [0, 1]
            link.close()
        else:
            with pytest.raises(PeerStalled):
                ReceiverLink(channel, hello)
        server.join(30)
        listener.close()
