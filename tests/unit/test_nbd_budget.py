"""budget.Budget: bytes and requests held at once, handed out in arrival order, closed on stop."""

from __future__ import annotations

import threading

from blocktrack.nbd.budget import Budget

WAIT = 60  # bound on every wait, so a bug fails instead of hanging; nothing is measured


class Taker:
    """take(cost) on a thread; ``waiting`` is set when the budget made it wait (on_wait)."""

    def __init__(self, budget: Budget, cost: int, order: list):
        self.budget = budget
        self.result = None
        self.cost = cost
        self._order = order
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.result = self.budget.take(self.cost)
        self._order.append(self.cost)

    def start(self, waits: "Waits") -> "Taker":
        before = waits.count
        self.thread.start()
        assert waits.wait_for(before + 1), "the take did not wait"
        return self

    def join(self):
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        return self.result


class Waits:
    """Counts on_wait calls, and lets a test wait for them."""

    def __init__(self):
        self.count = 0
        self._cond = threading.Condition()

    def __call__(self, budget):
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait_for(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= count, WAIT)


def test_an_empty_budget_admits_any_one_take():
    budget = Budget(100)
    assert budget.take(1000)
    assert (budget.held_bytes, budget.held_count) == (1000, 1)
    budget.give(1000)
    assert (budget.held_bytes, budget.held_count) == (0, 0)


def test_a_take_that_does_not_fit_waits_for_a_give():
    waits = Waits()
    budget = Budget(100, on_wait=waits)
    assert budget.take(80)
    order: list = []
    taker = Taker(budget, 30, order).start(waits)
    assert budget.waiting == 1 and order == []
    budget.give(80)
    assert taker.join() is True
    assert (budget.held_bytes, budget.held_count, budget.waiting) == (30, 1, 0)


def test_takers_are_served_in_arrival_order():
    """A small take that would fit waits behind a large one that came first (no starvation)."""
    waits = Waits()
    budget = Budget(100, on_wait=waits)
    assert budget.take(60)
    order: list = []
    large = Taker(budget, 50, order).start(waits)
    small = Taker(budget, 10, order).start(waits)   # 60 + 10 fits, but it is not its turn
    assert budget.waiting == 2 and budget.held_bytes == 60
    budget.give(60)
    assert large.join() is True and small.join() is True
    assert order == [50, 10]
    assert budget.held_bytes == 60


def test_the_request_count_is_bounded_too():
    waits = Waits()
    budget = Budget(1 << 30, max_count=2, on_wait=waits)
    assert budget.take(0) and budget.take(0)
    order: list = []
    third = Taker(budget, 0, order).start(waits)
    budget.give(0)
    assert third.join() is True and budget.held_count == 2


def test_close_wakes_the_waiters_and_refuses_later_takes():
    waits = Waits()
    budget = Budget(10, on_wait=waits)
    assert budget.take(10)
    order: list = []
    waiting = [Taker(budget, 5, order).start(waits) for _ in range(3)]
    budget.close()
    assert [t.join() for t in waiting] == [False, False, False]
    assert budget.take(1) is False
    assert (budget.held_bytes, budget.held_count, budget.waiting) == (10, 1, 0)
    budget.give(10)                                   # what was held is still given back
    assert (budget.held_bytes, budget.held_count) == (0, 0)
