"""How many loads run at once: a load beyond the limit queues, without a thread, until one ends."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

__all__ = ["LoadSlots", "Ticket"]


class Ticket:
    """One job handed to `LoadSlots.run`: queued until a slot is free, then started."""

    __slots__ = ("job", "name", "started")

    def __init__(self, job: Callable[[], None], name: str) -> None:
        # Dropped once taken: a ticket kept by its holder must not keep the job (and what the
        # job's closure holds, the loaded model) alive after it ran.
        self.job: Callable[[], None] | None = job
        self.name = name
        self.started = False


class LoadSlots:
    """Runs each job in a thread of its own, at most `limit` at a time, first come first served.

    Written by hand: asyncio's and anyio's semaphores belong to one event loop and a
    threading.Semaphore would block it; here nothing waits at all. A queued job is a ticket in a
    deque, not a thread, and it can be withdrawn (`cancel`) until its slot comes up.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"loads at once must be 1 or more, not {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._running = 0
        self._queue: deque[Ticket] = deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return len(self._queue)

    def run(self, job: Callable[[], None], *, name: str = "load") -> Ticket:
        """Start `job` in a thread now if a slot is free, else when one frees up."""
        ticket = Ticket(job, name)
        with self._lock:
            if self._running >= self.limit:
                self._queue.append(ticket)
                return ticket
            self._running += 1
            ticket.started = True
        self._spawn(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        """Withdraw a queued job; False once it has started (it then runs to its end)."""
        with self._lock:
            if ticket.started:
                return False
            try:
                self._queue.remove(ticket)
            except ValueError:
                return False
            ticket.job = None
            return True

    def _spawn(self, ticket: Ticket) -> None:
        threading.Thread(
            target=self._work, args=(ticket,), name=f"lazyserve-{ticket.name}", daemon=True
        ).start()

    def _work(self, ticket: Ticket) -> None:
        job, ticket.job = ticket.job, None
        try:
            if job is not None:
                job()
        finally:
            del job
            with self._lock:
                following = self._queue.popleft() if self._queue else None
                if following is None:
                    self._running -= 1
                else:  # the slot passes straight on: no window in which a newcomer jumps ahead
                    following.started = True
            if following is not None:
                self._spawn(following)
