"""Where inference runs: a worker thread until a function is known to be fast, inline after;
always inline while a Lambda invocation is served (one request per environment)."""

from __future__ import annotations

import threading
import time

import pytest

from lazyserve import timing
from lazyserve.environment import cpus
from lazyserve.workers import OFFLOAD_ABOVE, Inference, in_worker, one_at_a_time


def where() -> str:
    return threading.current_thread().name


def slow() -> str:
    time.sleep(OFFLOAD_ABOVE * 3)
    return where()


@pytest.mark.anyio
async def test_a_fast_function_moves_inline_after_its_first_call() -> None:
    inference = Inference(where)
    here = where()
    first = await inference.run()
    assert first.startswith("lazyserve-worker")  # unknown cost: the loop stays free
    assert [await inference.run() for _ in range(3)] == [here] * 3
    assert inference.mean is not None and inference.mean < OFFLOAD_ABOVE


@pytest.mark.anyio
async def test_a_slow_function_stays_in_the_worker() -> None:
    inference = Inference(slow)
    for _ in range(3):
        assert (await inference.run()).startswith("lazyserve-worker")


@pytest.mark.anyio
async def test_a_function_that_becomes_slow_moves_back_to_the_worker() -> None:
    delay = [0.0]

    def varying() -> str:
        time.sleep(delay[0])
        return where()

    inference = Inference(varying)
    await inference.run()
    assert await inference.run() == where()
    delay[0] = OFFLOAD_ABOVE * 20  # e.g. a much larger batch: one call blocks, then off it goes
    assert await inference.run() == where()
    assert (await inference.run()).startswith("lazyserve-worker")


@pytest.mark.anyio
async def test_one_at_a_time_runs_inline_even_the_first_call() -> None:
    inference = Inference(slow)
    with one_at_a_time():
        assert await inference.run() == where()


@pytest.mark.anyio
async def test_calls_record_infer_in_the_requests_timings() -> None:
    token = timing.begin()
    try:
        inference = Inference(where)
        await inference.run()  # in the worker: the request's context went along
        await inference.run()  # inline
        timings = timing.current()
        assert timings is not None
        assert [name for name, _ in timings.entries] == ["infer", "infer"]
    finally:
        timing.end(token)


@pytest.mark.anyio
async def test_in_worker_reuses_long_lived_threads() -> None:
    names = {await in_worker(where) for _ in range(20)}
    assert all(name.startswith("lazyserve-worker") for name in names)
    assert len(names) <= cpus()  # not a new thread per call, as anyio's pool is under Mangum
