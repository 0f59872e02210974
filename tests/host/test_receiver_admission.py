"""A receiver's port is open to anyone who can reach it: connections that never authenticate must not
keep the real sender out.

Each test holds connections open against a real `blocktrack receive --listen` (idle ones that never
speak, or slowloris ones that send part of a TLS ClientHello and stop, or drip it a byte at a time)
and then runs the real sender. The receiver's --stall-timeout and --handshake-timeout are set far
above what these tests wait, so the sender gets through because handshakes run side by side and a
source's oldest handshake makes way for its newest, not because the idle connections timed out.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time

import pytest

from blocktrack.migrate.scenario import sha256, start_migrate, start_receiver
from tests.conftest import MiB, blank_image, run_blocktrack, write_image
from tests.host.net_helpers import DropFirstProxy, make_pki, psk_file, tls_args

KEY = b"4f1c2a9be0d7735c1a2b3c4d5e6f7081"
HOLDERS = 25
PATIENT = ("--stall-timeout", "300", "--handshake-timeout", "300")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _auth(kind: str, tmp_path, pki, who: str) -> tuple:
    if kind == "psk":
        return ("--psk-file", psk_file(tmp_path / "psk", KEY))
    return tls_args(pki, who)


def client_hello() -> bytes:
    """The first flight of a real TLS 1.3 client (what a slowloris starts to send)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16 and len(hello) > 100  # a handshake record
    return hello


class Holders:
    """``count`` TCP connections to the receiver, opened one after the other, that never authenticate.

    Connects without blocking and waits (bounded) for each to be established, so the sender comes
    after them; a receiver that cannot take them all (a listen backlog of 1) leaves the rest still
    trying, which keeps the pressure on as well."""

    def __init__(self, port: int, count: int, *, first_bytes: bytes = b""):
        self.socks: list[socket.socket] = []
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            self.socks.append(sock)
        deadline = time.monotonic() + 10
        for sock in self.socks:
            _, writable, _ = select.select([], [sock], [], max(0.0, deadline - time.monotonic()))
            if writable and first_bytes and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                sock.send(first_bytes)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


@pytest.mark.parametrize("attack", ["idle", "partial-hello"])
@pytest.mark.parametrize("kind", ["psk", "cert"])
def test_sender_gets_through_connections_held_open(tmp_path, pki, kind, attack):
    source = write_image(tmp_path / "src.img", 4 * MiB, seed=41)
    target = blank_image(tmp_path / "dst.img", 4 * MiB)
    receiver, port = start_receiver([f"d={target}"], tmp_path / "state", *PATIENT,
                                    auth=_auth(kind, tmp_path, pki, "receiver"))
    first = client_hello()[:60] if attack == "partial-hello" else b""
    holders = None
    try:
        holders = Holders(port, HOLDERS, first_bytes=first)
        started = time.monotonic()
        sent = run_blocktrack("send", "--device", f"d={source}", "--to", f"127.0.0.1:{port}",
                              "--stall-timeout", "60", *_auth(kind, tmp_path, pki, "sender"), text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        # Through at once, not after any timeout (the handshake timeout here is 300 s).
        assert time.monotonic() - started < 30, time.monotonic() - started
        assert receiver.wait() == 0, receiver.stderr
        assert sha256(target) == sha256(source)
        # The connections held open from the sender's own address made way, oldest first; none of them
        # was ended by a timeout (both are 300 s here).
        refusals = [e["message"] for e in receiver.named("refused")]
        assert any("--max-handshakes-per-address" in m for m in refusals), refusals
        assert not any("timeout" in m for m in refusals), refusals
        assert "Traceback" not in receiver.stderr
    finally:
        if holders is not None:
            holders.close()
        if receiver.alive():
            receiver.stop()


def test_migrate_gets_through_idle_connections(tmp_path):
    source = write_image(tmp_path / "src.img", 8 * MiB, seed=42)
    target = blank_image(tmp_path / "dst.img", 8 * MiB)
    state = tmp_path / "state"
    key = psk_file(tmp_path / "psk", KEY)
    receiver, port = start_receiver([f"src.img={target}"], state, *PATIENT, auth=("--psk-file", key))
    holders = None
    try:
        holders = Holders(port, HOLDERS)
        migrate = start_migrate(source, port, tmp_path / "nbd.sock", state, "--stall-timeout", "60",
                                auth=("--psk-file", key))
        frozen = migrate.follow(lambda e: e.get("event") in ("frozen", "error"))
        assert frozen["event"] == "frozen", migrate.stderr
        assert receiver.wait() == 0, receiver.stderr
        assert receiver.named("summary")[-1]["result"] == "verified"
        assert sha256(target) == sha256(source)
        migrate.stop()
    finally:
        if holders is not None:
            holders.close()
        if receiver.alive():
            receiver.stop()


def test_idle_connections_from_other_addresses_are_closed_at_the_handshake_timeout(tmp_path):
    """Idle connections (here from four other addresses, so no cap is reached) are ended at
    --handshake-timeout, which is not --stall-timeout, and each is reported."""
    target = blank_image(tmp_path / "dst.img", MiB)
    receiver, port = start_receiver([f"d={target}"], tmp_path / "state", "--stall-timeout", "300",
                                    "--handshake-timeout", "2", auth=("--psk-file", psk_file(tmp_path / "k", KEY)))
    try:
        socks = []
        for n in range(2, 6):  # 127.0.0.2 .. 127.0.0.5: loopback takes the whole of 127/8
            sock = socket.socket()
            sock.bind((f"127.0.0.{n}", 0))
            sock.settimeout(30)
            sock.connect(("127.0.0.1", port))
            socks.append(sock)
        for sock in socks:
            # The receiver ends each within the handshake timeout: EOF, or a reset.
            ready, _, _ = select.select([sock], [], [], 60)
            assert ready, "the receiver kept an idle connection open past --handshake-timeout"
            try:
                assert sock.recv(4096) == b""
            except ConnectionResetError:
                pass
            sock.close()
        receiver.wait_event(lambda e: e.get("event") == "refused" and "127.0.0.5" in e["message"])
        messages = [e["message"] for e in receiver.named("refused")]
        assert all("--handshake-timeout" in m for m in messages), messages
        assert receiver.alive()
    finally:
        receiver.stop()


def test_a_slowloris_dripping_its_hello_is_cut_at_the_handshake_timeout(tmp_path, pki):
    """The handshake timeout bounds the whole handshake, not each wait: a peer that sends a byte now
    and then (each well within any per-read timeout) is still cut."""
    target = blank_image(tmp_path / "dst.img", MiB)
    receiver, port = start_receiver([f"d={target}"], tmp_path / "state", "--stall-timeout", "300",
                                    "--handshake-timeout", "3", auth=tls_args(pki, "receiver"))
    hello = client_hello()
    cut = threading.Event()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for byte in hello[:80]:  # never the whole ClientHello (40 s at this pace)
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    cut.set()
                    break
                ready, _, _ = select.select([sock], [], [], 0.5)
                if ready:
                    try:
                        data = sock.recv(4096)
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        cut.set()
                        break
        assert cut.is_set(), "the receiver let a dripping handshake run past --handshake-timeout"
        refused = receiver.wait_event("refused")
        assert "--handshake-timeout" in refused["message"], refused
        assert receiver.alive()
    finally:
        receiver.stop()


@pytest.mark.parametrize("kind", ["psk", "cert"])
def test_a_sender_dropped_before_authentication_tries_again(tmp_path, pki, kind):
    """Issue 25: the receiver's admission limits may close a sender's connection before its TLS
    handshake (too many unauthenticated connections from its address: the oldest makes way). The
    sender tries again, with short pauses, within its --stall-timeout, instead of failing at once
    with exit 5 as it did. Here a proxy resets its first two connections."""
    source = write_image(tmp_path / "src.img", 4 * MiB, seed=43)
    target = blank_image(tmp_path / "dst.img", 4 * MiB)
    receiver, port = start_receiver([f"d={target}"], tmp_path / "state", auth=_auth(kind, tmp_path, pki, "receiver"))
    proxy = DropFirstProxy(port, drop=2)
    try:
        started = time.monotonic()
        sent = run_blocktrack("send", "--device", f"d={source}", "--to", proxy.address, "--stall-timeout", "30",
                              *_auth(kind, tmp_path, pki, "sender"), text=True, timeout=120)
        elapsed = time.monotonic() - started
        assert sent.returncode == 0, sent.stderr
        assert proxy.dropped == 2
        assert elapsed < 30, f"{elapsed:.1f} s"
        assert receiver.wait() == 0, receiver.stderr
        assert sha256(target) == sha256(source)
    finally:
        proxy.close()
        if receiver.alive():
            receiver.stop()


def test_a_sender_always_dropped_gives_up_within_its_stall_timeout(tmp_path, pki):
    """The retries are bounded: a receiver that drops every connection before the handshake is
    reported after --stall-timeout, with what to look at, and exit 5."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drop_all():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.close()

    dropper = threading.Thread(target=drop_all, daemon=True)
    dropper.start()
    source = write_image(tmp_path / "src.img", MiB, seed=44)
    try:
        started = time.monotonic()
        sent = run_blocktrack("send", "--device", f"d={source}", "--to", f"127.0.0.1:{listener.getsockname()[1]}",
                              "--stall-timeout", "3", *_auth("psk", tmp_path, pki, "sender"), text=True, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        dropper.join(5)
        listener.close()
    assert sent.returncode == 5, sent.stderr
    assert "closed the connection before the handshake was done" in sent.stderr, sent.stderr
    assert "--max-handshakes-per-address" in sent.stderr
    assert 1 < elapsed < 20, f"{elapsed:.1f} s"    # it tried again (pauses 0.2, 0.4, 0.8 s ...), then gave up


def _proc_status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_a_thousand_connection_attempts_leave_the_receiver_bounded(tmp_path):
    """Issue 25: 1,000 connections from the sender's own address, made one after the other and left
    idle (the last hundred held open): the receiver's threads and memory do not grow with them (at
    most --max-handshakes-per-address handshakes per address, the oldest giving way and its thread
    ending at once), and the real sender then still gets through and verifies."""
    source = write_image(tmp_path / "src.img", 4 * MiB, seed=45)
    target = blank_image(tmp_path / "dst.img", 4 * MiB)
    key = ("--psk-file", psk_file(tmp_path / "psk", KEY))
    receiver, port = start_receiver([f"d={target}"], tmp_path / "state", *PATIENT, auth=key)
    pid = receiver.proc.pid
    base_rss = _proc_status(pid, "VmRSS")
    held: list[socket.socket] = []
    peak_threads = 0
    try:
        for i in range(1000):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=30))
            except OSError:
                continue     # a full backlog refused it: an attempt all the same
            if len(held) > 100:
                held.pop(0).close()
            if i % 25 == 0:
                peak_threads = max(peak_threads, _proc_status(pid, "Threads"))
        peak_threads = max(peak_threads, _proc_status(pid, "Threads"))
        grown = (_proc_status(pid, "VmHWM") - base_rss) << 10
        assert peak_threads <= 40, f"{peak_threads} threads in the receiver"
        assert grown < 64 * MiB, f"the receiver grew by {grown >> 20} MiB"
        started = time.monotonic()
        sent = run_blocktrack("send", "--device", f"d={source}", "--to", f"127.0.0.1:{port}", "--stall-timeout", "60",
                              *key, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        assert time.monotonic() - started < 30
        assert receiver.wait() == 0, receiver.stderr
        assert sha256(target) == sha256(source)
    finally:
        for s in held:
            s.close()
        if receiver.alive():
            receiver.stop()
