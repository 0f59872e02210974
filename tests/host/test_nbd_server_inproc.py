"""The NBD server in this process: sockets handed over directly (as the kernel backend will), the
freeze gate, replies out of order, shutdown with requests in flight, and the no-lost-update
invariant against a concurrent sender that clears the dirty map while clients write. Also the
accounting under load and under failures: buffers back in the pool only once no reply refers to
them, and the budgets and the gate given back whatever fails (issue 17)."""

from __future__ import annotations

import errno
import os
import random
import socket
import threading

import pytest

from blocktrack.nbd import connection as connection_module
from blocktrack.nbd import protocol as p
from blocktrack.nbd.client import NbdClient
from blocktrack.nbd.export import BufferPool, Export
from blocktrack.nbd.handshake import transmission_flags
from blocktrack.nbd.server import NbdServer
from blocktrack.nbd.sockio import PeerClosed
from tests.conftest import MiB, blank_image, write_image
from tests.host.nbd_helpers import LARGE_READ, pipelined_large_reads, stamped_image

WAIT = 120  # bound on every wait, so a bug fails instead of hanging; nothing is measured


class GatedExport(Export):
    """An Export whose reads (or writes) at chosen offsets wait until the test lets them go."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.gates: dict[int, threading.Event] = {}
        self.arrived: dict[int, threading.Event] = {}

    def hold(self, offset: int) -> threading.Event:
        self.gates[offset] = threading.Event()
        self.arrived[offset] = threading.Event()
        return self.gates[offset]

    def _wait(self, offset: int) -> None:
        if offset in self.gates:
            self.arrived[offset].set()
            assert self.gates[offset].wait(WAIT)

    def read_into(self, view, offset):
        self._wait(offset)
        super().read_into(view, offset)

    def write_from(self, view, offset, *, fua=False):
        self._wait(offset)
        super().write_from(view, offset, fua=fua)


@pytest.fixture
def image(tmp_path):
    return write_image(tmp_path / "disk.img", 16 * MiB, seed=2)


@pytest.fixture
def make_server():
    servers = []

    def make(export, **kw):
        server = NbdServer(export, handshake_timeout=WAIT, **kw)
        servers.append((server, export))
        return server

    yield make
    for server, export in servers:
        server.close()
        export.close()


def pair(server, handshake):
    """A socketpair: one end served (as the kernel backend does), the other for the test client."""
    ours, theirs = socket.socketpair()
    ours.settimeout(WAIT)
    handle = server.serve_socket(theirs, handshake=handshake, peer="socketpair")
    return NbdClient(ours), handle


def test_kernel_style_socket_no_handshake_simple_replies_many_in_flight(image, make_server):
    """What the kernel client does: no handshake on the wire, simple replies, many requests in
    flight, cookies as tags; size and flags come from transmission_flags() by ioctl."""
    export = Export(image)
    server = make_server(export)
    client, handle = pair(server, "none")
    flags = transmission_flags(export, structured=False)
    assert flags & p.NBD_FLAG_SEND_FLUSH and flags & p.NBD_FLAG_SEND_FUA and not flags & p.NBD_FLAG_SEND_DF
    original = image.read_bytes()
    payloads = {i: bytes([i]) * 131072 for i in range(1, 33)}
    cookies = {}
    for i, data in payloads.items():
        cookies[client.request(p.NBD_CMD_WRITE, i * 262144, payload=data, flags=p.NBD_CMD_FLAG_FUA)] = i
    for _ in payloads:
        reply = client.reply()
        assert reply.error == 0
        cookies.pop(reply.cookie)
    assert not cookies
    client.flush()
    client.trim(15 * MiB, MiB)
    client.write_zeroes(14 * MiB, 4096)
    reads = {client.request(p.NBD_CMD_READ, i * 262144, 131072): i for i in payloads}
    for _ in payloads:
        reply = client.reply()
        assert bytes(reply.data) == payloads[reads.pop(reply.cookie)]
    client.request(p.NBD_CMD_DISC)
    assert handle.join(WAIT)
    assert handle.end_reason == "client disconnected (NBD_CMD_DISC)"
    data = image.read_bytes()
    for i, payload in payloads.items():
        assert data[i * 262144:i * 262144 + 131072] == payload
    assert data[14 * MiB:14 * MiB + 4096] == bytes(4096)
    assert data[:262144] == original[:262144]
    assert sorted(export.dirty) == sorted({(i * 262144) // MiB for i in payloads} | {14, 15})
    client.close()


def test_oldstyle_greeting(image, make_server):
    server = make_server(Export(image))
    client, handle = pair(server, "oldstyle")
    greeting = client.recv(p.OLDSTYLE_HELLO.size + p.OLDSTYLE_ZEROES)
    magic, cliserv, size, flags = p.OLDSTYLE_HELLO.unpack_from(greeting)
    assert (magic, cliserv, size) == (p.NBDMAGIC, p.CLISERV_MAGIC, 16 * MiB)
    assert greeting[p.OLDSTYLE_HELLO.size:] == bytes(124) and flags & p.NBD_FLAG_HAS_FLAGS
    assert client.read(0, 512) == image.read_bytes()[:512]
    client.disconnect()
    assert handle.join(WAIT)


def test_newstyle_on_a_handed_over_socket(image, make_server):
    server = make_server(Export(image))
    client, handle = pair(server, "newstyle")
    client.handshake(contexts=["qemu:dirty-bitmap:blocktrack"])
    client.write(3 * MiB, b"x" * 100)
    assert client.block_status(0, 16 * MiB)["qemu:dirty-bitmap:blocktrack"] == [(3 * MiB, 0), (MiB, 1), (12 * MiB, 0)]
    client.disconnect()
    assert handle.join(WAIT)


def test_replies_leave_in_completion_order(image, make_server):
    export = GatedExport(image)
    server = make_server(export)
    client, _ = pair(server, "newstyle")
    client.handshake()
    release = export.hold(0)
    slow = client.request(p.NBD_CMD_READ, 0, 4096)
    fast = client.request(p.NBD_CMD_READ, MiB, 4096)
    first = client.reply()
    assert first.cookie == fast and first.error == 0          # answered while the first still waits
    release.set()
    second = client.reply()
    assert second.cookie == slow and bytes(second.data) == image.read_bytes()[:4096]
    client.disconnect()


def test_every_write_is_marked_before_its_reply(image, make_server):
    export = Export(image)
    server = make_server(export)
    client, _ = pair(server, "newstyle")
    client.handshake()
    rng = random.Random(5)
    for _ in range(200):
        offset = rng.randrange(0, 16 * MiB - 70000)
        length = rng.randrange(1, 70000)
        kind = rng.choice(["write", "zero", "trim"])
        if kind == "write":
            client.write(offset, b"\x01" * length)
        elif kind == "zero":
            client.write_zeroes(offset, length)
        else:
            client.trim(offset, length)
        # The reply has arrived: every chunk the request touched must already be marked.
        for chunk in range(offset // MiB, (offset + length - 1) // MiB + 1):
            assert export.dirty.test(chunk), (kind, offset, length, chunk)
        export.dirty.snapshot_and_clear()
    client.disconnect()


def test_no_lost_update_against_a_concurrent_sender(tmp_path, make_server):
    """ARCHITECTURE invariant 1, end to end: clients write through NBD on four connections while a
    "sender" repeatedly takes the dirty set (clearing it) and copies those chunks. After the writers
    stop and the sender copies what is still dirty, the copy equals the export."""
    size = 8 * MiB
    image = blank_image(tmp_path / "disk.img", size)
    export = Export(image)
    server = make_server(export)
    copy = bytearray(size)
    stop = threading.Event()
    copied_passes = [0]

    def sender():
        fd = os.open(image, os.O_RDONLY)
        try:
            while not stop.is_set():
                for chunk in export.dirty.snapshot_and_clear():
                    copy[chunk * MiB:(chunk + 1) * MiB] = os.pread(fd, MiB, chunk * MiB)
                copied_passes[0] += 1
        finally:
            os.close(fd)

    def writer(seed):
        client, _ = pair(server, "newstyle")
        client.handshake()
        rng = random.Random(seed)
        for _ in range(300):
            offset = rng.randrange(0, size - 9000)
            client.write(offset, rng.randbytes(rng.randrange(1, 9000)))
        client.disconnect()

    sending = threading.Thread(target=sender)
    sending.start()
    writers = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(WAIT)
    stop.set()
    sending.join(WAIT)
    assert copied_passes[0] > 0
    with open(image, "rb") as f:
        for chunk in export.dirty.snapshot_and_clear():   # the final pass, writes frozen
            copy[chunk * MiB:(chunk + 1) * MiB] = os.pread(f.fileno(), MiB, chunk * MiB)
    assert bytes(copy) == image.read_bytes()


def test_freeze_holds_new_requests_and_waits_for_those_in_flight(image, make_server):
    export = GatedExport(image)
    server = make_server(export)
    client, _ = pair(server, "newstyle")
    client.handshake()
    other, _ = pair(server, "newstyle")
    other.handshake()
    # A write in flight keeps freeze() from completing.
    release = export.hold(2 * MiB)
    inflight = client.request(p.NBD_CMD_WRITE, 2 * MiB, payload=b"\x22" * 4096)
    assert export.arrived[2 * MiB].wait(WAIT)
    assert server.freeze(timeout=0) is False                  # frozen, but one request still runs
    release.set()
    assert client.reply().cookie == inflight
    assert server.freeze(timeout=WAIT) is True                # nothing in flight now
    assert export.dirty.test(2)
    # While frozen, new requests are read but held: nothing changes, nothing is marked.
    before = image.read_bytes()
    marked = export.dirty.count()
    held = other.request(p.NBD_CMD_WRITE, 9 * MiB, payload=b"\x33" * 4096)
    assert server.gate.wait_held(1, WAIT)
    assert image.read_bytes() == before and export.dirty.count() == marked and not export.dirty.test(9)
    server.thaw()
    assert other.reply().cookie == held
    assert image.read_bytes()[9 * MiB:9 * MiB + 4096] == b"\x33" * 4096 and export.dirty.test(9)
    client.disconnect()
    other.disconnect()


def test_shutdown_answers_what_is_in_flight_then_closes(image, make_server):
    export = GatedExport(image)
    server = make_server(export)
    client, handle = pair(server, "newstyle")
    client.handshake()
    release = export.hold(MiB)
    cookie = client.request(p.NBD_CMD_READ, MiB, 4096)
    assert export.arrived[MiB].wait(WAIT)
    server.shutdown()
    release.set()
    reply = client.reply()
    assert reply.cookie == cookie and reply.error == 0
    assert client.at_eof()
    assert handle.join(WAIT) and handle.end_reason == "server shutting down"


def test_shutdown_while_frozen_ends_held_requests(image, make_server):
    export = Export(image)
    server = make_server(export)
    client, handle = pair(server, "newstyle")
    client.handshake()
    assert server.freeze(WAIT)
    client.request(p.NBD_CMD_WRITE, 0, payload=b"\x44" * 512)
    assert server.gate.wait_held(1, WAIT)
    server.shutdown()
    assert client.at_eof()
    assert handle.join(WAIT)
    assert image.read_bytes()[:512] != b"\x44" * 512
    assert export.dirty.count() == 0


class Events:
    """The server's events, collected from any thread."""

    def __init__(self):
        self.list: list[tuple[str, dict]] = []
        self._cond = threading.Condition()

    def __call__(self, name: str, fields: dict) -> None:
        with self._cond:
            self.list.append((name, fields))
            self._cond.notify_all()

    def named(self, name: str) -> list[dict]:
        with self._cond:
            return [fields for n, fields in self.list if n == name]

    def wait(self, name: str, count: int = 1) -> list[dict]:
        with self._cond:
            assert self._cond.wait_for(lambda: len([n for n, _ in self.list if n == name]) >= count, WAIT), \
                f"fewer than {count} {name} events: {self.list}"
        return self.named(name)


def serve_in_thread(server, path) -> threading.Thread:
    server.listen_unix(path)
    thread = threading.Thread(target=server.serve_forever, name="serve", daemon=True)
    thread.start()
    return thread


def test_many_connections_pipelining_the_largest_reads(tmp_path, make_server):
    """Issue 17, defect 1: eight connections each pipeline two 32 MiB READs of a 1 GiB export.
    Every reply comes whole and right, no connection meets an internal error, and afterwards
    nothing is left in flight: freeze() succeeds at once and the server stops."""
    image = stamped_image(tmp_path / "big.img")
    events = Events()
    server = make_server(Export(image), on_event=events)
    serving = serve_in_thread(server, tmp_path / "s.sock")
    failures = pipelined_large_reads(lambda: NbdClient.unix(tmp_path / "s.sock", timeout=WAIT))
    assert failures == []
    gone = events.wait("disconnected", 8)
    assert [g["reason"] for g in gone] == ["client disconnected (NBD_CMD_DISC)"] * 8
    assert all(g["errors"] == 0 and "internal_errors" not in g for g in gone), gone
    assert sum(g["bytes_read"] for g in gone) == 16 * LARGE_READ
    assert server.gate.inflight == 0
    assert server.budget.held_bytes == 0 and server.budget.held_count == 0
    assert server.freeze(timeout=0) is True
    server.thaw()
    server.shutdown()
    serving.join(WAIT)
    assert not serving.is_alive()
    assert events.named("internal_error") == []


class ViewCheckingPool(BufferPool):
    """Lends fresh buffers; closes each one given back. close() raises BufferError while any view
    of the buffer is alive, so a buffer given back while a reply still refers to it is counted."""

    def __init__(self):
        super().__init__(keep_bytes=0)
        self.returned = 0
        self.still_viewed: list[int] = []

    def put(self, buf) -> None:
        self.returned += 1
        try:
            buf.close()
        except BufferError:
            self.still_viewed.append(len(buf))


@pytest.mark.parametrize("structured", [True, False])
def test_a_buffer_goes_back_to_the_pool_only_once_no_reply_refers_to_it(image, make_server, structured):
    server = make_server(Export(image))
    server.pool = pool = ViewCheckingPool()
    client, handle = pair(server, "newstyle")
    client.handshake(structured=structured)
    rng = random.Random(7)
    expected = image.read_bytes()
    reads = {}
    for i in range(24):
        offset, length = rng.randrange(0, 15 * MiB), rng.choice([512, 4096, 65536, MiB])
        reads[client.request(p.NBD_CMD_READ, offset, length)] = (offset, length)
    for i in range(8):
        client.request(p.NBD_CMD_WRITE, i * MiB, payload=bytes([i]) * 8192)
    for _ in range(32):
        reply = client.reply()
        assert reply.error == 0
        if reply.cookie in reads:
            offset, length = reads.pop(reply.cookie)
            assert bytes(reply.data) == expected[offset:offset + length]
    client.disconnect()
    assert handle.join(WAIT)
    assert pool.returned == 32
    assert pool.still_viewed == []


class _Injected(RuntimeError):
    """The failure a test injects."""


class FailingExport(Export):
    def read_into(self, view, offset):
        if len(view) == 12345:
            raise _Injected("injected in the export")
        super().read_into(view, offset)


class FailingPool(BufferPool):
    """get() fails like mmap without memory, or put() raises, once, for a 12345-byte request."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.armed = True

    def get(self, length):
        if self.where == "buffer_get" and length == 12345 and self.armed:
            self.armed = False
            raise OSError(errno.ENOMEM, "Cannot allocate memory (injected)")
        return super().get(length)

    def put(self, buf):
        super().put(buf)
        if self.where == "buffer_put" and len(buf) == BufferPool.size_class(12345) and self.armed:
            self.armed = False
            raise _Injected("injected in put")


@pytest.mark.parametrize("where", ["export", "buffer_get", "buffer_put", "send"])
def test_a_failure_anywhere_in_a_request_keeps_the_accounting_right(image, make_server, monkeypatch, where):
    """Issue 17, defect 1: nothing that fails while a request is served may leave its buffer, its
    budgets or its place at the gate behind (a freeze would then wait for ever), and no thread dies.
    A bug while serving is answered with EIO; no buffer (ENOMEM) fails the request; a bug while
    sending hangs up. In every case the connection's end is reported and freeze() succeeds."""
    events = Events()
    export = FailingExport(image) if where == "export" else Export(image)
    server = make_server(export, on_event=events)
    server.pool = FailingPool(where)
    if where == "send":
        real_send_all = connection_module.send_all

        def send_all(sock, buffers):
            if any(len(b) == 12345 for b in buffers):
                raise _Injected("injected in send")
            real_send_all(sock, buffers)

        monkeypatch.setattr(connection_module, "send_all", send_all)
    client, handle = pair(server, "newstyle")
    client.handshake()
    expected = image.read_bytes()
    assert client.read(0, 4096) == expected[:4096]
    cookie = client.request(p.NBD_CMD_READ, 3 * MiB, 12345)
    if where == "send":
        with pytest.raises(PeerClosed):
            client.reply()                          # hung up: the stream could be out of step
    else:
        reply = client.reply()
        assert reply.cookie == cookie
        wanted = {"export": p.NBD_EIO, "buffer_get": p.NBD_ENOMEM, "buffer_put": 0}[where]
        assert reply.error == wanted, reply
        if where == "buffer_put":
            assert bytes(reply.data) == expected[3 * MiB:3 * MiB + 12345]
        client.write(MiB, b"\x77" * 4096)           # the connection goes on
        assert client.read(MiB, 4096) == b"\x77" * 4096
        client.disconnect()
    client.close()
    assert handle.join(WAIT)
    assert server.gate.inflight == 0
    assert server.budget.held_bytes == 0 and server.budget.held_count == 0
    assert server.freeze(timeout=0) is True
    server.thaw()
    gone = events.wait("disconnected")[0]
    if where == "buffer_get":
        assert gone["errors"] == 1 and "internal_errors" not in gone
    else:
        assert any("injected" in text for text in gone["internal_errors"]), gone
        assert "injected" in events.named("internal_error")[0]["error"]
    # The server still serves.
    again, again_handle = pair(server, "newstyle")
    again.handshake()
    assert again.read(3 * MiB, 4096) == expected[3 * MiB:3 * MiB + 4096]
    again.disconnect()
    assert again_handle.join(WAIT)


def test_shutdown_ends_a_reader_waiting_for_the_shared_budget(image, make_server):
    """A client that does not read its replies holds the whole shared budget; another connection's
    reader waits for it. Stopping the server ends that connection at once (it must not wait for
    buffers that may never come back); the first ends when its client goes."""
    events = Events()
    server = make_server(Export(image), max_total_inflight_bytes=LARGE_READ, on_event=events)
    hog, hog_handle = pair(server, "newstyle")
    hog.handshake()
    for _ in range(9):    # never read: 4 MiB READs (not streamed) hold their buffers until sent
        hog.request(p.NBD_CMD_READ, 0, connection_module.STREAM_PIECE)
    waiter, waiter_handle = pair(server, "newstyle")
    waiter.handshake()
    waiter.request(p.NBD_CMD_READ, 0, 4096)
    limit = events.wait("inflight_limit")[0]
    assert limit["max_inflight_bytes"] == LARGE_READ and limit["waiting"] >= 1
    server.shutdown()
    assert waiter_handle.join(WAIT)
    assert waiter_handle.end_reason == "server shutting down"
    assert hog_handle.thread.is_alive()              # still trying to send its replies
    hog.close()
    assert hog_handle.join(WAIT)
    assert server.gate.inflight == 0 and server.budget.held_bytes == 0
    waiter.close()


# -- streamed reads (issue 23) -----------------------------------------------------------------------------

class PieceFailingExport(Export):
    """Reads at ``fail_at`` fail with EIO (the third piece of a streamed READ, say)."""

    fail_at = 2 * connection_module.STREAM_PIECE

    def read_into(self, view, offset):
        if offset == self.fail_at:
            raise OSError(errno.EIO, "Input/output error (injected)")
        super().read_into(view, offset)


def test_a_large_read_is_streamed_in_pieces_of_structured_chunks(tmp_path, make_server):
    """A READ longer than STREAM_PIECE arrives as one data chunk per piece, the last one marked
    done, and whole; with NBD_CMD_FLAG_DF as a single chunk."""
    image = stamped_image(tmp_path / "big.img", 64 * MiB)
    server = make_server(Export(image))
    client, _handle = pair(server, "newstyle")
    client.handshake(structured=True)
    reply = client.call(p.NBD_CMD_READ, 0, LARGE_READ)
    assert reply.chunk_types == [p.NBD_REPLY_TYPE_OFFSET_DATA] * (LARGE_READ // connection_module.STREAM_PIECE)
    assert bytes(reply.data) == image.read_bytes()[:LARGE_READ]
    whole = client.call(p.NBD_CMD_READ, LARGE_READ, LARGE_READ, p.NBD_CMD_FLAG_DF)
    assert whole.chunk_types == [p.NBD_REPLY_TYPE_OFFSET_DATA]
    assert bytes(whole.data) == image.read_bytes()[LARGE_READ:]
    client.disconnect()
    assert server.gate.inflight == 0 and server.budget.held_bytes == 0


def test_an_error_in_the_middle_of_a_streamed_read(tmp_path, make_server):
    """Structured replies: the pieces before the error arrive as data, then an error chunk with
    its offset, and the connection goes on. Simple replies: the header (error 0) went out with the
    first piece, so the only honest way to tell the client is to hang up."""
    image = stamped_image(tmp_path / "big.img", 64 * MiB)
    server = make_server(PieceFailingExport(image))
    client, handle = pair(server, "newstyle")
    client.handshake(structured=True)
    cookie = client.request(p.NBD_CMD_READ, 0, LARGE_READ)
    reply = client.reply()
    assert reply.cookie == cookie and reply.error == p.NBD_EIO
    assert reply.chunk_types == [p.NBD_REPLY_TYPE_OFFSET_DATA] * 2 + [p.NBD_REPLY_TYPE_ERROR_OFFSET]
    assert reply.error_offset == PieceFailingExport.fail_at
    assert client.read(LARGE_READ, 4096) == image.read_bytes()[LARGE_READ:LARGE_READ + 4096]
    client.disconnect()
    assert handle.join(WAIT)

    simple, handle = pair(server, "newstyle")
    simple.handshake(structured=False)
    simple.request(p.NBD_CMD_READ, 0, LARGE_READ)
    with pytest.raises((PeerClosed, ConnectionError, ValueError, OSError)):
        simple.reply()
    assert handle.join(WAIT)
    assert server.gate.inflight == 0 and server.budget.held_bytes == 0 and server.budget.held_count == 0


def test_a_client_that_reads_no_reply_holds_one_piece_and_blocks_no_one(tmp_path, make_server):
    """A client pipelines eight 32 MiB READs and reads nothing; the server's shared budget is the
    size of one such READ. The stalled client holds at most one piece of it, so another client's
    32 MiB READ is served at once (before streaming it waited for ever)."""
    image = stamped_image(tmp_path / "big.img", 64 * MiB)
    server = make_server(Export(image), max_total_inflight_bytes=LARGE_READ)
    hog, hog_handle = pair(server, "newstyle")
    hog.handshake(structured=False)
    for k in range(8):
        hog.request(p.NBD_CMD_READ, (k % 2) * LARGE_READ, LARGE_READ)
    other, _ = pair(server, "newstyle")
    other.handshake(structured=True)
    assert bytes(other.read(LARGE_READ, LARGE_READ)) == image.read_bytes()[LARGE_READ:]
    assert server.budget.held_bytes <= connection_module.STREAM_PIECE
    other.disconnect()
    hog.close()
    assert hog_handle.join(WAIT)
    assert server.gate.inflight == 0 and server.budget.held_bytes == 0
