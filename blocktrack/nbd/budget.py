"""Budget: how many bytes (and requests) an NBD server may hold for requests in flight.

A request's data lives in a pooled buffer from the moment its header is read until its reply has
been sent, and a client that sends requests but never reads the replies keeps those buffers full.
So the reader of each connection takes a request's cost from two budgets before it reads on: its
connection's (``Connection``) and the server's, shared by all connections (``NbdServer``). When a
budget is spent the reader stops reading its socket until a request finishes: the client is slowed
down, nothing is refused, and the server's memory stays bounded whatever its clients do.

Rules:

* A budget that holds nothing admits any one request, however large, so a single request can
  never wait for ever (a connection's budget is at least the protocol's largest request anyway).
* Takers are served in arrival order: a 32 MiB request is not starved by a stream of small ones
  from other connections that would each fit.
* ``close()`` (the server is stopping) wakes every waiter; ``take`` then returns False and the
  reader ends its connection instead of waiting for buffers that may never come back.
"""

from __future__ import annotations

import threading
from typing import Callable


class Budget:
    """At most ``max_bytes`` (and ``max_count`` takes, when given) held at once; see the module
    docstring. ``on_wait``, when given, is called (without any lock held) each time a take has to
    wait: the server reports that its limit was reached."""

    def __init__(self, max_bytes: int, max_count: int | None = None, *,
                 on_wait: Callable[["Budget"], None] | None = None):
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.on_wait = on_wait
        self._cond = threading.Condition()
        self._bytes = 0
        self._count = 0
        self._next_ticket = 0      # arrival order of takers
        self._serving = 0          # the ticket whose turn it is
        self._waiting = 0
        self._closed = False

    def _fits(self, cost: int) -> bool:
        if self._count == 0:
            return True
        if self.max_count is not None and self._count >= self.max_count:
            return False
        return self._bytes + cost <= self.max_bytes

    def take(self, cost: int) -> bool:
        """Wait for the turn of this caller and for ``cost`` to fit, then hold it; False (holding
        nothing) when the budget was closed."""
        with self._cond:
            if self._closed:
                return False
            if self._waiting == 0 and self._fits(cost):   # the common case: nobody queued, room left
                self._bytes += cost
                self._count += 1
                return True
            ticket = self._next_ticket
            self._next_ticket += 1
            self._waiting += 1
        if self.on_wait is not None:
            self.on_wait(self)
        with self._cond:
            try:
                while not self._closed and not (ticket == self._serving and self._fits(cost)):
                    self._cond.wait()
                if self._closed:
                    return False
                self._bytes += cost
                self._count += 1
                return True
            finally:
                self._waiting -= 1
                if ticket == self._serving:
                    self._serving += 1
                    self._cond.notify_all()

    def try_take(self, cost: int) -> bool:
        """Take ``cost`` only if that needs no wait (nobody queued, room left); never blocks."""
        with self._cond:
            if self._closed or self._waiting or not self._fits(cost):
                return False
            self._bytes += cost
            self._count += 1
            return True

    def give(self, cost: int) -> None:
        """Give back what one take held."""
        with self._cond:
            self._bytes -= cost
            self._count -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """Refuse every take from now on and wake those waiting (they return False)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def held_bytes(self) -> int:
        return self._bytes

    @property
    def held_count(self) -> int:
        return self._count

    @property
    def waiting(self) -> int:
        """Takers waiting for their turn or for room."""
        return self._waiting
