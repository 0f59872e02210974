"""blocktrack.acceptor with real loopback sockets and a one-line handshake: "good" authenticates, "bad"
is refused, silence waits. Client sockets bind to 127.0.0.N to come from different source addresses
(loopback answers for all of 127/8).

What is checked: the caps make the oldest handshake give way (per address, then overall from the
busiest address), the deadline ends a silent connection, the first success wins and the rest are
closed, decisions of one address are taken one at a time with a pause after a refusal while other
addresses go on, and a flood of refusals is summed up rather than reported line by line.
"""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest

from blocktrack.acceptor import Limits, accept_first, source_of
from blocktrack.errors import AuthenticationError

WAIT = 60.0


class Won:
    def __init__(self, conn, handshake):
        self.conn, self.handshake = conn, handshake

    def close(self):
        self.conn.close()


class LineAuth:
    """``authenticate`` for accept_first; records each decision (source, start, end, verdict)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.deciding: dict[str, int] = {}
        self.most_at_once: dict[str, int] = {}
        self.decisions: list[tuple[str, float, float, bool]] = []

    def __call__(self, conn, handshake):
        try:
            conn.settimeout(handshake.remaining())
            handshake.hold_back()
            line = conn.makefile("rb").readline()
            with handshake.turn():
                source = handshake.source
                with self.lock:
                    self.deciding[source] = self.deciding.get(source, 0) + 1
                    self.most_at_once[source] = max(self.most_at_once.get(source, 0), self.deciding[source])
                started = time.monotonic()
                time.sleep(0.05)  # a decision takes a while (an scrypt in the real thing)
                with self.lock:
                    self.deciding[source] -= 1
                    self.decisions.append((source, started, time.monotonic(), line == b"good\n"))
                if line != b"good\n":
                    raise AuthenticationError(f"{handshake.where}: said {line!r}")
            return Won(conn, handshake)
        except (OSError, TimeoutError) as exc:
            conn.close()
            raise AuthenticationError(f"{handshake.where}: {exc}") from None
        except BaseException:
            conn.close()
            raise


class Server:
    def __init__(self, limits: Limits, auth=None):
        self.listening = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listening.getsockname()[1]
        self.auth = auth or LineAuth()
        self.refusals: list[str] = []
        self.result = None
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(limits,), daemon=True)
        self.thread.start()

    def _run(self, limits):
        try:
            self.result = accept_first(self.listening, self.auth, limits, on_refused=self.refusals.append)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def connect(self, n: int) -> socket.socket:
        sock = socket.socket()
        sock.bind((f"127.0.0.{n}", 0))
        sock.settimeout(WAIT)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def finish(self):
        self.thread.join(WAIT)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.result

    def wait_refusals(self, count: int) -> list[str]:
        deadline = time.monotonic() + WAIT
        while len(self.refusals) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.refusals)


def closed_by_peer(sock: socket.socket, timeout: float = WAIT) -> bool:
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def still_open(sock: socket.socket) -> bool:
    ready, _, _ = select.select([sock], [], [], 0)
    return not ready


def test_source_addresses():
    assert source_of("10.1.2.3") == "10.1.2.3"
    assert source_of("::ffff:10.1.2.3") == "10.1.2.3"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_of("fe80::1%eth0") == "fe80::/64"


def test_over_the_per_address_cap_the_oldest_makes_way():
    server = Server(Limits(timeout=WAIT, per_source=2, total=10))
    first, second = server.connect(2), server.connect(2)
    third = server.connect(2)
    assert closed_by_peer(first)
    assert still_open(second) and still_open(third)
    assert "--max-handshakes-per-address 2" in server.wait_refusals(1)[0]
    sender = server.connect(3)  # another address is not counted against 127.0.0.2
    sender.sendall(b"good\n")
    won = server.finish()
    assert won.handshake.source == "127.0.0.3"
    assert closed_by_peer(second) and closed_by_peer(third)  # the losers are closed
    won.close()


def test_over_the_total_cap_the_busiest_address_makes_way():
    server = Server(Limits(timeout=WAIT, per_source=8, total=3))
    a1, a2, b1 = server.connect(2), server.connect(2), server.connect(3)
    c1 = server.connect(4)
    assert closed_by_peer(a1)
    assert still_open(a2) and still_open(b1) and still_open(c1)
    assert "--max-handshakes 3" in server.wait_refusals(1)[0]
    c1.sendall(b"good\n")
    assert server.finish().handshake.source == "127.0.0.4"


def test_a_silent_connection_is_ended_at_the_deadline():
    listening = socket.create_server(("127.0.0.1", 0))
    silent = socket.create_connection(listening.getsockname())
    with pytest.raises(AuthenticationError, match="within 0.5 s \\(--handshake-timeout\\)"):
        accept_first(listening, LineAuth(), Limits(timeout=0.5))  # without on_refused: raised
    assert closed_by_peer(silent)


def test_decisions_of_one_address_are_paced_and_others_go_on():
    pause = 0.5
    server = Server(Limits(timeout=WAIT, per_source=8, total=64, refusal_pause=pause))
    guessers = [server.connect(2) for _ in range(4)]
    for sock in guessers:
        sock.sendall(b"bad\n")
    assert len(server.wait_refusals(4)) == 4
    decisions = sorted(d for d in server.auth.decisions if d[0] == "127.0.0.2")
    assert server.auth.most_at_once["127.0.0.2"] == 1  # one at a time
    for (_, _, ended, _), (_, started, _, _) in zip(decisions, decisions[1:]):
        assert started - ended >= pause * 0.9  # each waited the pause after the refusal before it
    # Now 127.0.0.2 is paused for a long time: a right answer from it waits, one from elsewhere does not.
    server.auth.decisions.clear()
    slow = Server(Limits(timeout=WAIT, per_source=8, total=64, refusal_pause=WAIT))
    slow.connect(2).sendall(b"bad\n")
    slow.wait_refusals(1)
    patient = slow.connect(2)
    patient.sendall(b"good\n")
    other = slow.connect(3)
    other.sendall(b"good\n")
    won = slow.finish()
    assert won.handshake.source == "127.0.0.3"
    assert closed_by_peer(patient)
    won.close()
    for sock in guessers:
        sock.close()


def test_a_flood_is_summed_up_not_reported_line_by_line():
    server = Server(Limits(timeout=WAIT, per_source=1, total=64))
    socks = [server.connect(2) for _ in range(30)]  # each new one replaces the one before
    assert all(closed_by_peer(s) for s in socks[:-1])
    sender = server.connect(3)
    sender.sendall(b"good\n")
    server.finish().close()
    refusals = server.refusals
    assert len(refusals) < 29, refusals
    counted = 0
    for message in refusals:
        if "more connections from 127.0.0.2" in message or "more from 127.0.0.2" in message:
            counted += int(message.split(" more")[0].split("(")[-1])
    assert counted + sum("more" not in m for m in refusals) == 29, refusals


def test_without_on_refused_the_first_refusal_is_raised():
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"bad\n")
        with pytest.raises(AuthenticationError, match="said b'bad"):
            accept_first(listening, LineAuth(), Limits(timeout=WAIT))
    assert listening.fileno() == -1  # closed
