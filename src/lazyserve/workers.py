"""Where inference runs: inline on the event loop, or in a long-lived worker thread so the loop
stays free for other requests (`/health`) while a slow model computes."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, ParamSpec, TypeVar

from lazyserve import timing
from lazyserve.environment import cpus

__all__ = ["OFFLOAD_ABOVE", "Inference", "alone", "in_worker", "one_at_a_time", "spawn"]

P = ParamSpec("P")
R = TypeVar("R")

OFFLOAD_ABOVE = 0.002
"""Seconds: a predict function whose calls take longer than this on average runs in a worker
thread; faster ones run inline. A hop to a thread and back costs about 0.1 ms of the loop's
time plus a GIL hand-over, and the loop already spends about 0.3-0.5 ms per request parsing,
validating and serialising; inference shorter than that blocks other requests less than the
hop would cost them (docs/how-a-load-works.md, "Where inference runs, and the garbage
collector")."""
_SMOOTHING = 0.2  # weight of the newest call in the running mean

_workers: ThreadPoolExecutor | None = None
_workers_lock = threading.Lock()
# Set while a Lambda invocation is served: one request per execution environment at a time,
# so nothing can run while inference holds the loop, and a thread hop buys nothing.
_one_at_a_time: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "lazyserve_one_at_a_time", default=False
)


async def in_worker(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run blocking work (inference) in a long-lived worker thread; the event loop stays free.

    Starlette's run_in_threadpool (anyio) stops its threads when the root task ends, which
    under Mangum is every invocation: a new thread, and a new OpenMP team for torch, per call.
    """
    # The caller's context goes along: what the work records reaches its Server-Timing.
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool(), call)


def spawn(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Future[R]:
    """Start blocking work in the same long-lived worker threads, from any thread, without
    awaiting it (batching.py: a batch's call, which answers its requests' loops itself). Raises
    RuntimeError once the interpreter is shutting down."""
    return _pool().submit(fn, *args, **kwargs)


def _pool() -> ThreadPoolExecutor:
    global _workers
    if _workers is None:
        with _workers_lock:
            if _workers is None:
                _workers = ThreadPoolExecutor(cpus(), thread_name_prefix="lazyserve-worker")
    return _workers


def alone() -> bool:
    """Inside `one_at_a_time()`: the request served is the only one in flight (a Lambda
    invocation)."""
    return _one_at_a_time.get()


class one_at_a_time:
    """Mark the requests served inside the block as the only ones in flight (a Lambda
    invocation): their inference runs inline."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _one_at_a_time.set(True)

    def __exit__(self, *exc: object) -> None:
        _one_at_a_time.reset(self._token)


class Inference(Generic[R]):
    """Runs one predict function and records `infer` timings; decides inline or worker thread
    from the function's own measured call times (see OFFLOAD_ABOVE)."""

    def __init__(self, fn: Callable[..., R], *, offload_above: float = OFFLOAD_ABOVE) -> None:
        self.fn = fn
        self.offload_above = offload_above
        self.mean: float | None = None  # running mean of call seconds; None until one ran

    def __call__(self, *args: object) -> R:
        """Run in this thread (direct and queued Lambda invocations)."""
        started = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self._observe(time.perf_counter() - started)

    async def run(self, *args: object) -> R:
        """Run for an HTTP request: inline when that is cheaper for everyone, else in a worker."""
        mean = self.mean
        if _one_at_a_time.get() or (mean is not None and mean < self.offload_above):
            return self(*args)
        # Unknown (first call) or slow: keep the loop free.
        return await in_worker(self, *args)

    def _observe(self, seconds: float) -> None:
        timing.record("infer", seconds)
        mean = self.mean
        self.mean = seconds if mean is None else mean + _SMOOTHING * (seconds - mean)
