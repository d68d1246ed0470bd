"""The single-flight holder: loads a value once per process, on first need, for every caller."""

from __future__ import annotations

import asyncio
import contextvars
import copy
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, Literal, TypeVar

from lazyserve import timing
from lazyserve.errors import LazyserveError, ModelLoadError, ModelLoadTimeout, ModelUnavailable
from lazyserve.slots import LoadSlots, Ticket

__all__ = ["RECHECK_SECONDS", "LazyModel", "Recheck", "Status"]

T = TypeVar("T")
Status = Literal["not_loaded", "loading", "loaded", "failed"]
Recheck = Callable[[ModelUnavailable], bool]
"""`recheck(error)`: may the object behind the load that failed with `error` have changed?"""
log = logging.getLogger("lazyserve")

RECHECK_SECONDS = 30.0
"""A load that failed with an error no retry changes (`retryable` False: a bad file, a failed
digest, weights that cannot fit, a missing object) is remembered: requests get a copy of its
error at once, without a load. When a request finds the failure at least this many seconds
after the last look, lazyserve asks the holder's `recheck` in a thread of its own (never on the
request's path) whether the object changed, and forgets the failure if it may have; the next
request then loads. Without a `recheck`, the first request after this many seconds loads again:
at most one download of a bad object per interval, not one per request."""


class LazyModel(Generic[T]):
    """Holds what `load()` returns; the first caller starts the load, the others wait for it.

    Usable from async code (`await holder.aget()`, or `Depends(holder)` in FastAPI), from
    threads (`holder.get()`) and from any number of event loops. A failure no retry changes is
    remembered (see RECHECK_SECONDS); `slots`, shared by many holders, bounds how many of them
    load at once.
    """

    def __init__(
        self,
        load: Callable[[], T],
        *,
        wait: float = 25.0,
        name: str = "model",
        source: str | None = None,
        recheck: Recheck | None = None,
        recheck_every: float = RECHECK_SECONDS,
        slots: LoadSlots | None = None,
    ) -> None:
        self._load = load
        self.wait = wait
        self.name = name
        self.source = source
        self._recheck = recheck
        self.recheck_every = recheck_every
        self._slots = slots
        # A threading.Lock, held only for a few instructions, never across an await: unlike an
        # asyncio.Lock it belongs to no event loop, and threads can share it.
        self._lock = threading.Lock()
        self._future: Future[T] | None = None
        # The loaded value once there is one: the warm path reads one attribute, not the
        # future (whose result() takes its condition's lock).
        self._value: T | None = None
        self.loads_started = 0
        self.loads_succeeded = 0
        self.last_error: ModelUnavailable | None = None
        self._failure: ModelUnavailable | None = None  # remembered: no retry changes it
        self._looked_at = 0.0  # time.monotonic() of the failure, then of the last recheck
        self._rechecking = False
        self.rechecks = 0
        self._waiting = 0  # callers inside get()/aget() now
        self._ticket: Ticket | None = None  # the current load's place in `slots`

    @property
    def status(self) -> Status:
        future = self._future
        if future is None:
            return "not_loaded"
        if not future.done():
            return "loading"
        return "failed" if future.exception() is not None else "loaded"

    def peek(self) -> T | None:
        """The loaded value, or None; never starts a load and never waits."""
        value = self._value
        if value is not None:
            return value
        loaded = self._loaded()
        return loaded.result() if loaded is not None else None

    def _loaded(self) -> Future[T] | None:
        future = self._future
        if future is not None and future.done() and future.exception() is None:
            return future
        return None

    @property
    def failure(self) -> ModelUnavailable | None:
        """The error of a failed load that no retry changes, while it is remembered (requests
        get a copy of it without a load); None otherwise."""
        return self._failure

    def forget(self, error: ModelUnavailable | None = None) -> bool:
        """Stop answering with the remembered failure (only if it is still `error`, when given):
        the next request loads again. True when one was forgotten."""
        with self._lock:
            if self._failure is None or (error is not None and self._failure is not error):
                return False
            self._failure = None
            return True

    def start(self) -> Future[T]:
        """Start a load unless one is running or has succeeded, or a failure is remembered;
        return its future."""
        return self._begin(waiting=False)

    def _begin(self, *, waiting: bool) -> Future[T]:
        with self._lock:
            # Counted under the lock that hands out the future: a load queued for a slot is
            # withdrawn when its last waiter leaves, never while another one is arriving.
            self._waiting += waiting
            future = self._future
            failure = self._failure
            if future is not None and (not future.done() or future.exception() is None):
                return future
            if future is not None and failure is not None:
                if self._rechecking or time.monotonic() - self._looked_at < self.recheck_every:
                    return future
                if self._recheck is not None:
                    self._rechecking = True
                    self._looked_at = time.monotonic()
                else:  # nothing can tell whether the object changed: load it again
                    self._failure = failure = None
            if future is None or failure is None:
                return self._new_load()
        self._spawn(self._run_recheck, failure, role="recheck")
        return future

    def _new_load(self) -> Future[T]:
        # With the lock held.
        future: Future[T] = Future()
        # Marked running before anyone can see it, so no waiter can cancel it.
        future.set_running_or_notify_cancel()
        self._future = future
        self.loads_started += 1
        if self._slots is not None:
            # The caller's context goes along, so the load's log lines carry its request id.
            job = functools.partial(contextvars.copy_context().run, self._run, future)
            self._ticket = self._slots.run(job, name=f"load-{self.name}")
        else:
            self._spawn(self._run, future, role="load")
        return future

    def _spawn(self, target: Callable[[Any], None], arg: Any, *, role: str) -> None:
        # A thread of its own rather than a loop's executor: a load must outlive the request
        # and the event loop that started it, and sync callers have no loop at all. The
        # caller's context goes along, so the thread's log lines carry its request id.
        context = contextvars.copy_context()
        threading.Thread(
            target=context.run,
            args=(target, arg),
            name=f"lazyserve-{role}-{self.name}",
            daemon=True,
        ).start()

    def _run_recheck(self, error: ModelUnavailable) -> None:
        assert self._recheck is not None
        try:
            changed = self._recheck(error)
        except Exception as exc:
            changed = False
            log.warning(
                "%s: cannot tell whether the object behind the failed load changed: %s",
                self.name,
                exc,
                exc_info=not isinstance(exc, LazyserveError),
            )
        with self._lock:
            self._rechecking = False
            self.rechecks += 1
        if changed and self.forget(error):
            log.info(
                "%s: the object behind the failed load changed; the next request loads it",
                self.name,
            )

    def _run(self, future: Future[T]) -> None:
        started = time.perf_counter()
        try:
            value = self._load()
        except BaseException as exc:
            error = exc if isinstance(exc, ModelUnavailable) else _wrap(exc)
            log.error(
                "%s load failed after %.3fs: %s",
                self.name,
                time.perf_counter() - started,
                error,
                exc_info=not isinstance(exc, LazyserveError),
            )
            _drop_frames(error)
            with self._lock:
                self.last_error = error
                self._ticket = None
                # Before the future is done: a waiter woken by it must find it remembered.
                if not error.retryable and self._future is future:
                    self._failure = error
                    self._looked_at = time.monotonic()
            future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        else:
            with self._lock:
                self.loads_succeeded += 1
                self.last_error = None
                self._ticket = None
            future.set_result(value)
            self._value = value

    def swap(self, value: T) -> None:
        """Serve `value` from now on (a new version, loaded and checked beside the current one).
        Callers that already have the current value keep it: each request finishes on the
        version it started with."""
        future: Future[T] = Future()
        future.set_running_or_notify_cancel()
        future.set_result(value)
        with self._lock:
            self._future = future
            self._value = value
            self.loads_started += 1
            self.loads_succeeded += 1
            self.last_error = None
            self._failure = None

    def unload(self) -> None:
        """Let go of the loaded value or the remembered failure (its pool dropped it): the
        status is `not_loaded` again. Callers that have the value keep it; a load under way
        is left alone."""
        with self._lock:
            future = self._future
            if future is not None and not future.done():
                return
            self._future = None
            self._value = None
            self._failure = None

    def get(self, timeout: float | None = None) -> T:
        """Block this thread until the value is loaded (at most `timeout`, default `wait`)."""
        value = self._value
        if value is not None:
            return value
        loaded = self._loaded()
        if loaded is not None:
            return loaded.result()
        # Timed from here, not from "the future is not done yet": a load fast enough to end
        # before this thread looks again was still waited for (the GIL), and the caller that
        # started it must show it (Server-Timing `load`).
        started = time.perf_counter()
        future = self._begin(waiting=True)
        limit = self.wait if timeout is None else timeout
        try:
            if not _wait(future, limit):
                raise self._timeout(limit)
            return _outcome(future)
        finally:
            self._leave(future)
            timing.record("load", time.perf_counter() - started)

    async def aget(self, timeout: float | None = None) -> T:
        """Await the value without blocking the event loop; cancelling the caller leaves the load
        running for the others."""
        value = self._value
        if value is not None:
            return value
        loaded = self._loaded()
        if loaded is not None:
            return loaded.result()
        started = time.perf_counter()  # see get()
        future = self._begin(waiting=True)
        try:
            if not future.done():
                loop = asyncio.get_running_loop()
                ready = loop.create_future()

                def wake(_: Future[T]) -> None:
                    try:
                        loop.call_soon_threadsafe(_set_done, ready)
                    except RuntimeError:  # that loop has closed; its waiter is gone too
                        pass

                future.add_done_callback(wake)
                limit = self.wait if timeout is None else timeout
                try:
                    await asyncio.wait_for(ready, limit)
                except TimeoutError:
                    raise self._timeout(limit) from None
            return _outcome(future)
        finally:
            self._leave(future)
            timing.record("load", time.perf_counter() - started)

    async def __call__(self) -> T:
        """FastAPI dependency: `model: Annotated[T, Depends(holder)]`."""
        return await self.aget()

    def _leave(self, future: Future[T]) -> None:
        """A caller stops waiting (answered, timed out or cancelled). When the last one leaves a
        load still queued for a slot, the load is withdrawn: nobody is left to want it, and it
        would take a slot, a download and memory from models that are wanted."""
        with self._lock:
            self._waiting -= 1
            ticket = self._ticket
            if (
                self._waiting
                or ticket is None
                or future is not self._future
                or self._slots is None
                or not self._slots.cancel(ticket)
            ):
                return
            self._future = None
            self._ticket = None
            self.loads_started -= 1
        # Nobody waits on it; resolved all the same, so nothing can hang on it.
        future.set_exception(ModelLoadTimeout(f"the {self.name} load was withdrawn unstarted"))

    def _timeout(self, limit: float) -> ModelLoadTimeout:
        ticket, slots = self._ticket, self._slots
        if ticket is not None and slots is not None and not ticket.started:
            return ModelLoadTimeout(
                f"the {self.name} did not start loading within {limit:g}s: other models are "
                f"loading (at most {slots.limit} at once); retry shortly"
            )
        return ModelLoadTimeout(
            f"the {self.name} is still loading after {limit:g}s; the load carries on, retry shortly"
        )


def _wait(future: Future[T], limit: float) -> bool:
    try:
        future.exception(timeout=limit)
    except TimeoutError:
        return False
    return True


def _outcome(future: Future[T]) -> T:
    """The load's value, or its error raised as a copy of its own: re-raising the one shared
    error object would add each waiter's frames (and what they hold, a request body say) to its
    traceback, kept alive with the failed load until the next success."""
    error = future.exception()
    if error is None:
        return future.result()
    clone = copy.copy(error)  # class, args and attributes; not the traceback
    clone.__cause__ = error.__cause__
    clone.__suppress_context__ = True
    raise clone


def _set_done(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _wrap(exc: BaseException) -> ModelLoadError:
    wrapped = ModelLoadError(f"{type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def _drop_frames(error: BaseException) -> None:
    # The error outlives the load (last_error, the future); its tracebacks' frames would keep
    # the half-filled weights buffer alive, so a retry would hold the weights twice.
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        cause.__traceback__ = None
        cause = cause.__cause__ or cause.__context__
