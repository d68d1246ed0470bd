"""Deadlines for whole requests. A socket timeout bounds each wait for a byte, not a whole body:
a peer that sends a byte every few seconds never trips it. Each GET here must end by its
deadline (`body_deadline`), and one thread per process (`watch`) cuts the connection of a request
whose deadline passed, however its bytes trickle. Neither http.client nor urllib3 bounds a whole
response (urllib3's `Timeout(total=...)` too is checked only between reads), so this is ours."""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable

__all__ = ["BODY_FLOOR", "FIRST_BYTE", "Watch", "body_deadline", "watch"]

FIRST_BYTE = 5.0
"""Seconds a response may take before its body starts, within a body's deadline."""
BODY_FLOOR = 1024 * 1024
"""Bytes per second below which a body is given up on: each GET must deliver its bytes within
FIRST_BYTE + size / BODY_FLOOR seconds (an 8 MiB part: 13 s; S3 serves one connection at about
90 MB/s), so an endpoint that trickles a byte every few seconds ends like one that stalls."""


def body_deadline(size: int, now: float | None = None) -> float:
    """The time.monotonic() by which a GET of `size` bytes must be complete."""
    return (time.monotonic() if now is None else now) + FIRST_BYTE + size / BODY_FLOOR


class Watch:
    """One request's deadline; `arm(cancel)` gives the way to interrupt its blocked read from
    the watchdog's thread."""

    __slots__ = ("_cancel", "_lock", "deadline", "done", "expired", "order")

    def __init__(self, deadline: float, order: int) -> None:
        self.deadline = deadline
        self.order = order
        self.expired = False
        self.done = False
        self._cancel: Callable[[], None] | None = None
        self._lock = threading.Lock()

    def __lt__(self, other: Watch) -> bool:
        return (self.deadline, self.order) < (other.deadline, other.order)

    def arm(self, cancel: Callable[[], None]) -> None:
        with self._lock:
            self._cancel = cancel
            late = self.expired
        if late:  # the deadline passed before the request had a connection to cut
            cancel()

    def fire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            cancel = self._cancel
        if cancel is not None:
            cancel()

    def finish(self) -> None:
        with self._lock:
            self.done = True
            self._cancel = None


class _Watchdog:
    """One thread per process that interrupts the reads whose deadline passed. A socket timeout
    bounds each wait for a byte, not a whole body: a peer sending a byte every few seconds never
    trips it, so a body's deadline needs a second thread to cut the connection."""

    def __init__(self) -> None:
        self._heap: list[Watch] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._counter = itertools.count()

    def watch(self, deadline: float) -> Watch:
        watch = Watch(deadline, next(self._counter))
        with self._cond:
            if self._thread is None or self._pid != os.getpid():  # new, or after a fork
                self._heap = []
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="lazyserve-deadlines", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, watch)
            if self._heap[0] is watch:
                self._cond.notify()
        return watch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                first = self._heap[0]
                left = first.deadline - time.monotonic()
                if left > 0 and not first.done:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
            first.fire()  # outside the lock: cutting a socket may take a moment


_WATCHDOG = _Watchdog()


def watch(deadline: float) -> Watch:
    """A watch on one request that must end by `deadline` (time.monotonic()): `arm(cancel)` it
    once the request has a connection to cut, `finish()` it when the request ends."""
    return _WATCHDOG.watch(deadline)
