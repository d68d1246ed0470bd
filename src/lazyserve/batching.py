"""Batched prediction: requests in flight at once are gathered into one call of a
`@service.predict_batch` function, one call in flight per model while the next gathers."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from lazyserve import timing
from lazyserve.errors import LazyserveError, PredictFailed
from lazyserve.logs import request_id
from lazyserve.workers import alone, spawn

__all__ = [
    "DEFAULT_MAX_SIZE",
    "DEFAULT_MAX_WAIT_MS",
    "MAX_SIZE_LIMIT",
    "MAX_WAIT_MS_LIMIT",
    "Batcher",
    "check_limits",
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
BatchCall = Callable[[Any, list[Req]], list[Resp]]
"""`call(loaded, requests) -> responses`: the user's function, under torch.inference_mode()."""

log = logging.getLogger("lazyserve")

DEFAULT_MAX_SIZE = 32
DEFAULT_MAX_WAIT_MS = 5.0
MAX_SIZE_LIMIT = 4096  # the same bounds as LAZYSERVE_BATCH_MAX and LAZYSERVE_BATCH_WAIT_MS
MAX_WAIT_MS_LIMIT = 1000.0


def check_limits(max_size: object, max_wait_ms: object) -> None:
    """Raise ValueError unless `max_size` is a whole number from 1 to 4096 and `max_wait_ms` a
    number of milliseconds from 0 to 1000 (the settings' bounds)."""
    if isinstance(max_size, bool) or not isinstance(max_size, int):
        raise ValueError(f"max_size={max_size!r}: accepted: a whole number from 1 to 4096")
    if not 1 <= max_size <= MAX_SIZE_LIMIT:
        raise ValueError(f"max_size={max_size!r}: accepted: a whole number from 1 to 4096")
    ok = (
        not isinstance(max_wait_ms, bool)
        and isinstance(max_wait_ms, int | float)
        and math.isfinite(max_wait_ms)
        and 0 <= max_wait_ms <= MAX_WAIT_MS_LIMIT
    )
    if not ok:
        raise ValueError(
            f"max_wait_ms={max_wait_ms!r}: accepted: a number of milliseconds from 0 to 1000"
        )


@dataclass(eq=False)
class _Item:
    """One HTTP request waiting for its batch: what to run it with and where to answer."""

    loaded: Any
    request: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    timings: timing.Timings | None
    request_id: str | None
    arrived: float  # the batcher's clock: when the request joined the queue
    queued: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Queue:
    """The requests of one model not yet in a call; `busy` while a call of its requests is in
    flight or being gathered (one at a time)."""

    cond: threading.Condition
    items: deque[_Item] = field(default_factory=deque)
    busy: bool = False


class Batcher(Generic[Req, Resp]):
    """Gathers concurrent requests into calls of `call(loaded, requests)`, per model `key`.

    A request that finds no call in flight and no other request queued goes at once (a batch of
    one). While a call runs, the requests that arrive queue; when it ends, up to `max_size` of
    them go in the next call. With two or more queued but fewer than `max_size`, the call waits
    for more until the oldest has waited `max_wait_ms`. Nothing here belongs to an event loop:
    the gathering and the calls run in lazyserve's worker threads, under one threading lock,
    and each request's answer is handed to its own loop (call_soon_threadsafe).
    """

    def __init__(
        self,
        call: BatchCall[Req, Resp],
        *,
        name: str,
        max_size: int = DEFAULT_MAX_SIZE,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_limits(max_size, max_wait_ms)
        self._call = call
        self.name = name
        self.max_size = max_size
        self.max_wait_ms = float(max_wait_ms)
        self._clock = clock
        self._lock = threading.Lock()
        self._queues: dict[Hashable, _Queue] = {}  # models with requests queued or a call out
        self._stats: dict[Hashable, tuple[int, int, int]] = {}  # calls, requests, last size

    # -- one call -------------------------------------------------------------------------------

    def run(self, key: Hashable, loaded: Any, requests: list[Req]) -> list[Resp]:
        """One call in this thread: its responses, one per request, in order. Records `infer`
        (the call's duration) in the current timings and counts the call under `key`. Raises
        what the function raised, or TypeError when it returned another number of responses."""
        with self._lock:
            calls, total, _ = self._stats.get(key, (0, 0, 0))
            self._stats[key] = (calls + 1, total + len(requests), len(requests))
        started = time.perf_counter()
        try:
            responses = self._call(loaded, requests)
        finally:
            timing.record("infer", time.perf_counter() - started)
        if not isinstance(responses, list | tuple) or len(responses) != len(requests):
            count = len(responses) if isinstance(responses, list | tuple) else None
            got = f"{count} responses" if count is not None else type(responses).__name__
            raise TypeError(
                f"{self.name}() returned {got} for {len(requests)} requests: return a list "
                "with one response per request, in order"
            )
        return list(responses)

    def stats(self, key: Hashable = None) -> dict[str, int | float | None]:
        """What `GET /model` shows: the limits in effect, calls made, their mean and last size."""
        with self._lock:
            calls, total, last = self._stats.get(key, (0, 0, 0))
        return {
            "max_size": self.max_size,
            "max_wait_ms": self.max_wait_ms,
            "calls": calls,
            "mean_size": round(total / calls, 3) if calls else None,
            "last_size": last if calls else None,
        }

    def waiting(self, key: Hashable = None) -> int:
        """Requests of `key` queued for a call that has not started."""
        with self._lock:
            queue = self._queues.get(key)
            return len(queue.items) if queue is not None else 0

    # -- HTTP requests --------------------------------------------------------------------------

    async def submit(self, key: Hashable, loaded: Any, request: Req) -> Resp:
        """The response to `request`, from a call shared with the requests of model `key`
        (served by `loaded`) in flight at the same time. A failed call raises PredictFailed
        (logged with every request id of the batch) in each of its requests; HTTP exceptions
        and lazyserve's own errors the function raised on purpose, as they are."""
        if alone():
            # A Lambda invocation: nothing else can be in flight, nothing will join.
            timing.note("batch", "size=1")
            try:
                return self.run(key, loaded, [request])[0]
            except Exception as exc:
                raise self._failure(exc, [request_id()])[0] from None
        loop = asyncio.get_running_loop()
        item = _Item(
            loaded,
            request,
            loop,
            loop.create_future(),
            timing.current(),
            request_id(),
            self._clock(),
        )
        with self._lock:
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(threading.Condition(self._lock))
            queue.items.append(item)
            start = not queue.busy
            queue.busy = True
            queue.cond.notify()  # a call waiting for more: one more came
        if start:
            self._schedule(key, queue)
        result: Resp = await item.future
        return result

    def _schedule(self, key: Hashable, queue: _Queue) -> None:
        try:
            # One call per task, then the next call is a new task: models share the worker
            # threads in turn, and a busy model cannot hold one for as long as it has requests.
            spawn(self._next, key, queue)
        except RuntimeError as exc:  # the interpreter is shutting down
            self._abandon(key, queue, exc)

    def _next(self, key: Hashable, queue: _Queue) -> None:
        batch: list[_Item] = []
        try:
            batch = self._gather(key, queue)
            if not batch:
                return
            self._answer(key, batch)
        except BaseException as exc:
            # Only a bug of lazyserve's gets here: no request may wait forever for a call that
            # will not come.
            self._abandon(key, queue, exc, tuple(batch))
            return
        with self._lock:
            if not queue.items:  # nothing came meanwhile (a lone request): idle, no new task
                self._idle(key, queue)
                return
        self._schedule(key, queue)

    def _gather(self, key: Hashable, queue: _Queue) -> list[_Item]:
        """The next call's requests, or [] (and the queue idle) when none is left."""
        with queue.cond:
            items = queue.items
            while True:
                while items and items[0].future.done():
                    items.popleft()  # cancelled: nobody waits for its answer
                if not items:
                    self._idle(key, queue)
                    return []
                if len(items) == 1 or len(items) >= self.max_size:
                    break
                left = items[0].arrived + self.max_wait_ms / 1000 - self._clock()
                if left <= 0:
                    break
                queue.cond.wait(left)
            # One model version per call: a refresh may have swapped it between two requests.
            loaded = items[0].loaded
            batch: list[_Item] = []
            while items and len(batch) < self.max_size and items[0].loaded is loaded:
                batch.append(items.popleft())
            return batch

    def _idle(self, key: Hashable, queue: _Queue) -> None:
        """No call in flight and none to gather (the lock held): the next request starts one."""
        queue.busy = False
        if self._queues.get(key) is queue:
            del self._queues[key]

    def _answer(self, key: Hashable, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            responses: list[Any] = self.run(key, batch[0].loaded, [i.request for i in batch])
        except Exception as exc:
            self._deliver(batch, self._failure(exc, [i.request_id for i in batch]), failed=True)
            return
        ms = (time.perf_counter() - started) * 1000
        size = f"size={len(batch)}"
        for item in batch:
            if item.timings is not None:
                item.timings.entries.append(("queue", (started - item.queued) * 1000))
                item.timings.entries.append(("infer", ms))
                item.timings.notes.append(("batch", size))
        self._deliver(batch, responses, failed=False)

    def _failure(self, exc: Exception, ids: list[str | None]) -> list[Exception]:
        """What each request of a failed call raises (see submit), the failure logged once."""
        if isinstance(exc, HTTPException | LazyserveError | RequestValidationError):
            return [exc] * len(ids)
        named = [rid or uuid.uuid4().hex for rid in ids]
        log.error(
            "%s() raised %s for a batch of %d requests",
            self.name,
            type(exc).__name__,
            len(named),
            exc_info=exc,
            extra={"request_ids": named},
        )
        return [PredictFailed(rid) for rid in named]

    def _deliver(self, batch: list[_Item], outcomes: list[Any], *, failed: bool) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Item, Any]]] = {}
        for item, outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(item.loop, []).append((item, outcome))
        for loop, answers in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, answers, failed)
            except RuntimeError:
                pass  # that loop is closed: nobody waits for these answers

    def _abandon(
        self, key: Hashable, queue: _Queue, exc: BaseException, batch: tuple[_Item, ...] = ()
    ) -> None:
        """Fail `batch` and every request still queued: their calls cannot run."""
        with self._lock:
            left = [*batch, *queue.items]
            queue.items.clear()
            self._idle(key, queue)
        named = [item.request_id or uuid.uuid4().hex for item in left]
        log.error(
            "%d batched requests of %s() abandoned: %s",
            len(left),
            self.name,
            type(exc).__name__,
            exc_info=exc,
            extra={"request_ids": named},
        )
        self._deliver(left, [PredictFailed(rid) for rid in named], failed=True)


def _settle(answers: list[tuple[_Item, Any]], failed: bool) -> None:
    """On the requests' own loop: hand each its answer (or its failure)."""
    for item, outcome in answers:
        if item.future.done():  # cancelled while its call ran
            continue
        if failed:
            item.future.set_exception(outcome)
        else:
            item.future.set_result(outcome)
