"""Authenticating the connections to a listening receiver side by side, until one succeeds.

A receiver waits for one sender, but anyone who can reach its port can connect. Taken one at a time,
a single connection that never speaks would hold the port for as long as the handshake may take, and
a loop of them for ever. So every connection gets its own handshake thread at once, and:

* a deadline: the whole handshake (TLS and any key proof) must end within ``Limits.timeout``
  (``--handshake-timeout``); the accept loop shuts down a connection still handshaking then, so a
  peer that drips a byte now and then gains nothing;
* caps: at most ``per_source`` handshakes at once from one source address (an IPv6 /64 counts as
  one address, as one host commonly has a whole /64) and ``total`` overall. A connection over a cap
  neither waits nor is turned away: it takes the place of the oldest handshake of its own source
  (over the total cap: of the source with the most). Connections held open therefore cannot lock a
  sender out; to keep it out one must open new connections from its own address faster than it
  completes a handshake;
* pacing: the decisive step of a key proof is taken through ``Handshake.turn()``: one at a time per
  source, at most ``decisions`` at once overall (each is an scrypt of 32 MiB), and a source whose
  credentials were refused (a key proof, a TLS certificate) waits ``refusal_pause`` before its next
  decision and its next handshake, so guessing a key online stays slow without one source holding
  up the others;
* the first connection that authenticates wins; every other is shut down and closed;
* reports: every connection closed without authenticating is passed to ``on_refused``, at most one a
  second per source (a flood is summed up: "N more from SOURCE").

The accept loop owns all bookkeeping; the handshake threads only report results through a queue, and
the loop ends a handshake through a duplicate of its socket (shutdown wakes the thread's blocked
read; the thread closes its own descriptor), so no descriptor is ever closed under another thread.
"""

from __future__ import annotations

import contextlib
import ipaddress
import queue
import socket
import threading
import time
from dataclasses import dataclass

from blocktrack.errors import AuthenticationError

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_PER_SOURCE = 8
DEFAULT_TOTAL = 64
REFUSAL_PAUSE = 1.0
_WAKE_CHECK = 0.1   # seconds between two looks at whether a waiting handshake was ended


@dataclass(frozen=True)
class Limits:
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    per_source: int = DEFAULT_PER_SOURCE
    total: int = DEFAULT_TOTAL
    refusal_pause: float = REFUSAL_PAUSE
    decisions: int = 2


def source_of(host: str) -> str:
    """The address a connection is counted against: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Handshake:
    """One connection being authenticated: where it comes from, its deadline, and how it may decide."""

    def __init__(self, peer, limits: Limits, pacer: "_Pacer"):
        self.where = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        self.source = source_of(peer[0])
        self.started = time.monotonic()
        self.deadline = self.started + limits.timeout
        self._pacer = pacer
        self.ended_by: str | None = None  # why the accept loop ended it, if it did
        self.ended = threading.Event()
        self.control: socket.socket | None = None

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def turn(self):
        """A context manager around the decisive step (see the module docstring)."""
        return self._pacer.turn(self)

    def hold_back(self) -> None:
        """Wait, within the deadline, until this source's pause after a refusal is over."""
        self._pacer.hold_back(self)

    def credentials_refused(self) -> None:
        """The peer showed credentials and they were refused (a TLS certificate): pause its source.
        (A key proof refused inside ``turn()`` pauses it already.) Timeouts, hang-ups and closing to
        make room are no guesses and pause nothing: were they to, a source could be kept paused."""
        self._pacer.refused(self.source)

    def end(self, reason: str) -> None:
        if self.ended_by is None:
            self.ended_by = reason
        self.ended.set()
        try:
            self.control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Ended(AuthenticationError):
    """The accept loop ended this handshake (deadline, room for a newer one): no decision was taken."""


class _Source:
    def __init__(self):
        self.lock = threading.Lock()
        self.not_before = 0.0
        self.users = 0


class _Pacer:
    def __init__(self, limits: Limits):
        self.limits = limits
        self._sources: dict[str, _Source] = {}
        self._mutex = threading.Lock()
        self._slots = threading.BoundedSemaphore(limits.decisions)

    @contextlib.contextmanager
    def _source(self, name: str):
        with self._mutex:
            entry = self._sources.setdefault(name, _Source())
            entry.users += 1
        try:
            yield entry
        finally:
            with self._mutex:
                entry.users -= 1
                if not entry.users and entry.not_before <= time.monotonic():
                    del self._sources[name]

    def refused(self, name: str) -> None:
        with self._mutex:
            entry = self._sources.setdefault(name, _Source())
            entry.not_before = time.monotonic() + self.limits.refusal_pause
            if len(self._sources) > 4 * self.limits.total:  # forget paused sources whose pause is over
                now = time.monotonic()
                for key in [k for k, e in self._sources.items() if not e.users and e.not_before <= now]:
                    del self._sources[key]

    def hold_back(self, handshake: Handshake) -> None:
        with self._source(handshake.source) as entry:
            self._sleep_until(handshake, entry.not_before)

    @staticmethod
    def _sleep_until(handshake: Handshake, when: float) -> None:
        wait = when - time.monotonic()
        if wait > 0:
            if handshake.ended.wait(min(wait, handshake.remaining())):
                raise AuthenticationError(handshake.ended_by)
            if time.monotonic() < when:
                raise TimeoutError

    @staticmethod
    def _acquire(acquire, handshake: Handshake) -> None:
        """``acquire(timeout=...)`` within the handshake's deadline, giving up as soon as the accept
        loop ends the handshake: a waiter made to give way must not keep its thread (and descriptors)
        until its deadline, or a flood of connections would pile threads up."""
        while True:
            if handshake.ended.is_set():
                raise _Ended(handshake.ended_by)
            remaining = handshake.remaining()
            if remaining <= 0:
                raise TimeoutError
            if acquire(timeout=min(remaining, _WAKE_CHECK)):
                return

    @contextlib.contextmanager
    def turn(self, handshake: Handshake):
        with self._source(handshake.source) as entry:
            self._acquire(entry.lock.acquire, handshake)
            try:
                self._sleep_until(handshake, entry.not_before)
                self._acquire(self._slots.acquire, handshake)
                try:
                    if handshake.ended.is_set():  # ended while it waited: decide nothing, pause nobody
                        raise _Ended(handshake.ended_by)
                    yield
                except _Ended:
                    raise
                except AuthenticationError:  # a decided refusal: the source waits before its next one
                    entry.not_before = time.monotonic() + self.limits.refusal_pause
                    raise
                finally:
                    self._slots.release()
            finally:
                entry.lock.release()


class _Reports:
    """Passes refusals on, at most one a second per source; the rest are counted and summed up."""

    def __init__(self, on_refused, interval: float):
        self.on_refused = on_refused
        self.interval = interval
        self._last: dict[str, float] = {}
        self._unreported: dict[str, int] = {}

    def refused(self, source: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._last.get(source, -self.interval) < self.interval:
            self._unreported[source] = self._unreported.get(source, 0) + 1
            return
        more = self._unreported.pop(source, 0)
        self._last[source] = now
        self.on_refused(reason + (f" ({more} more from {source} refused since the last report)" if more else ""))
        if len(self._last) > 1024:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval or k in self._unreported}

    def flush(self) -> None:
        for source, more in sorted(self._unreported.items()):
            self.on_refused(f"{more} more connections from {source} were refused (not reported one by one)")
        self._unreported.clear()


def accept_first(listening: socket.socket, authenticate, limits: Limits, *, on_refused=None):
    """Accept connections on ``listening`` and authenticate each in its own thread, with
    ``authenticate(conn, handshake)`` (it owns and closes ``conn``, raises AuthenticationError to
    refuse, and returns an object with ``close()``); return what it returned for the first to succeed.

    Refusals go to ``on_refused(reason)`` (called from this thread only); without it the first refusal
    is raised. The listening socket is closed when this returns or raises."""
    results: queue.Queue = queue.Queue()
    pacer = _Pacer(limits)
    reports = _Reports(on_refused, limits.refusal_pause) if on_refused is not None else None
    settled = threading.Lock()
    state = {"settled": False}
    pending: dict[Handshake, None] = {}  # in arrival order
    stop = threading.Event()
    acceptor = threading.Thread(target=_accept_loop, args=(listening, results, stop), name="accept", daemon=True)
    acceptor.start()

    def run(conn, handshake):
        try:
            outcome = authenticate(conn, handshake)
        except AuthenticationError as exc:
            results.put(("refused", handshake, str(exc)))
        except BaseException as exc:  # a bug: the accept loop raises it
            results.put(("error", handshake, exc))
        else:
            with settled:
                if not state["settled"]:
                    results.put(("done", handshake, outcome))
                    return
            outcome.close()  # another connection won meanwhile

    try:
        while True:
            now = time.monotonic()
            for handshake in pending:
                if handshake.ended_by is None and handshake.deadline <= now:
                    handshake.end(f"no complete handshake within {limits.timeout:g} s (--handshake-timeout)")
            live = [h.deadline for h in pending if h.ended_by is None]
            try:
                item = results.get(timeout=max(0.0, min(live) - now) if live else None)
            except queue.Empty:
                continue
            kind = item[0]
            if kind == "accepted":
                _, conn, peer = item
                handshake = Handshake(peer, limits, pacer)
                try:
                    handshake.control = conn.dup()
                except OSError:  # out of descriptors: this one cannot be watched, so it is not taken
                    conn.close()
                    continue
                _make_room(pending, handshake, limits)
                pending[handshake] = None
                threading.Thread(target=run, args=(conn, handshake), name=f"handshake {handshake.where}",
                                 daemon=True).start()
                continue
            _, handshake, payload = item
            pending.pop(handshake, None)
            handshake.control.close()
            if kind == "done":
                with settled:
                    state["settled"] = True
                _close_late_winners(results)
                return payload
            if kind == "error":
                raise payload
            reason = f"{handshake.where}: {handshake.ended_by}" if handshake.ended_by else payload
            if reports is None:
                raise AuthenticationError(reason)
            reports.refused(handshake.source, reason)
    finally:
        with settled:
            state["settled"] = True  # a handshake that succeeds from now on closes its own result
        stop.set()
        try:
            listening.shutdown(socket.SHUT_RDWR)  # wakes the acceptor's accept()
        except OSError:
            pass
        acceptor.join(5)
        listening.close()
        for handshake in pending:
            handshake.end("another connection authenticated first")
            handshake.control.close()
        _close_late_winners(results)
        if reports is not None:
            reports.flush()


def _make_room(pending: dict, newcomer: Handshake, limits: Limits) -> None:
    live = [h for h in pending if h.ended_by is None]
    same = [h for h in live if h.source == newcomer.source]
    if len(same) >= limits.per_source:
        same[0].end(f"closed to make room: {len(same)} handshakes from {newcomer.source} were in progress "
                    f"(--max-handshakes-per-address {limits.per_source}), and the oldest makes way for the newest")
    elif len(live) >= limits.total:
        counts: dict[str, int] = {}
        for h in live:
            counts[h.source] = counts.get(h.source, 0) + 1
        busiest = max(counts, key=lambda s: (counts[s], -min(h.started for h in live if h.source == s)))
        oldest = next(h for h in live if h.source == busiest)
        oldest.end(f"closed to make room: {len(live)} handshakes were in progress (--max-handshakes "
                   f"{limits.total}), and the oldest of the busiest address makes way for a newcomer")


def _close_late_winners(results: queue.Queue) -> None:
    while True:
        try:
            item = results.get_nowait()
        except queue.Empty:
            return
        if item[0] == "accepted":
            item[1].close()
        elif item[0] == "done":
            item[2].close()


def _accept_loop(listening: socket.socket, results: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn, peer = listening.accept()
        except OSError:
            if stop.is_set():
                return
            # EMFILE, ENFILE, ENOBUFS or a connection aborted in the queue: try again shortly rather than spin.
            time.sleep(0.1)
            continue
        if stop.is_set():
            conn.close()
            return
        results.put(("accepted", conn, peer))
