"""LazyModel: one load per process, whoever asks first, from threads, tasks and event loops."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI

from lazyserve.errors import (
    ModelFetchError,
    ModelFormatError,
    ModelIntegrityError,
    ModelLoadError,
    ModelLoadTimeout,
    ModelMissing,
    ModelTooLarge,
    ModelUnavailable,
)
from lazyserve.lazy import LazyModel
from lazyserve.slots import LoadSlots

WAIT = 10.0  # upper bound for any wait in these tests; never reached when the code is right


class Loader:
    """A loader that counts its calls, can be held at a gate and can fail on chosen calls."""

    def __init__(
        self,
        *,
        gated: bool = False,
        fail_on: Callable[[int], BaseException | None] = (lambda n: None),
    ) -> None:
        self.calls = 0
        self.stuck = False
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.entered = threading.Event()
        self.fail_on = fail_on
        self.values: list[object] = []
        self._lock = threading.Lock()

    def __call__(self) -> object:
        with self._lock:
            self.calls += 1
            call = self.calls
        self.entered.set()
        # A gate that was never opened fails this call and every later one at once, so a
        # regression (say, a blocked event loop) fails the test instead of hanging it.
        if self.stuck or not self.gate.wait(WAIT):
            self.stuck = True
            raise AssertionError("the test never opened the loader's gate")
        error = self.fail_on(call)
        if error is not None:
            raise error
        value = object()
        self.values.append(value)
        return value


class Arrivals:
    """Counts callers that are about to ask the holder (thread-safe)."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def arrive(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait_for(self, n: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= n, WAIT)


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until `predicate()` holds (bounded, so a bug fails instead of hanging)."""
    with anyio.fail_after(WAIT):
        while not predicate():
            await anyio.sleep(0.001)


def test_sequential_gets_load_once_and_status_follows_the_load() -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader)
    assert holder.status == "not_loaded"

    future = holder.start()
    assert loader.entered.wait(WAIT)
    assert holder.status == "loading"
    loader.gate.set()
    value = future.result(WAIT)

    assert holder.status == "loaded"
    assert all(holder.get() is value for _ in range(20))
    assert loader.calls == 1
    assert (holder.loads_started, holder.loads_succeeded) == (1, 1)


@pytest.mark.anyio
async def test_sequential_agets_load_once() -> None:
    loader = Loader()
    holder: LazyModel[object] = LazyModel(loader)
    values = [await holder.aget() for _ in range(20)]
    assert all(v is values[0] for v in values)
    assert loader.calls == 1
    assert holder.status == "loaded"


def test_peek_never_starts_a_load() -> None:
    loader = Loader()
    holder: LazyModel[object] = LazyModel(loader)
    for _ in range(5):
        assert holder.peek() is None
    assert loader.calls == 0
    assert holder.status == "not_loaded"
    assert holder.loads_started == 0

    value = holder.get()
    assert holder.peek() is value
    assert loader.calls == 1


def test_peek_is_none_while_loading() -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader)
    holder.start()
    assert loader.entered.wait(WAIT)
    assert holder.peek() is None
    loader.gate.set()
    assert holder.get() is not None


@pytest.mark.anyio
async def test_concurrent_tasks_on_one_loop_share_one_load() -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader)
    arrivals = Arrivals()

    async def ask() -> object:
        arrivals.arrive()
        return await holder.aget()

    tasks = [asyncio.create_task(ask()) for _ in range(50)]
    await wait_until(lambda: arrivals.count == 50)
    assert not any(t.done() for t in tasks)
    assert holder.status == "loading"
    loader.gate.set()
    values = await asyncio.gather(*tasks)

    assert loader.calls == 1
    assert all(v is values[0] for v in values)
    assert values[0] is loader.values[0]


def test_concurrent_threads_share_one_load() -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader)
    barrier = threading.Barrier(32)
    arrivals = Arrivals()
    results: list[object] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            barrier.wait(WAIT)
            arrivals.arrive()
            value = holder.get()
            with lock:
                results.append(value)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for t in threads:
        t.start()
    assert arrivals.wait_for(32)
    loader.gate.set()
    for t in threads:
        t.join(WAIT)

    assert errors == []
    assert len(results) == 32
    assert loader.calls == 1
    assert all(v is results[0] for v in results)


def test_threads_and_two_event_loops_share_one_load() -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader)
    thread_count, loop_count, tasks_per_loop = 8, 2, 10
    barrier = threading.Barrier(thread_count + loop_count)
    arrivals = Arrivals()
    results: list[object] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def in_thread() -> None:
        try:
            barrier.wait(WAIT)
            arrivals.arrive()
            value = holder.get()
            with lock:
                results.append(value)
        except BaseException as exc:
            errors.append(exc)

    async def many_tasks() -> list[object]:
        async def ask() -> object:
            arrivals.arrive()
            return await holder.aget()

        return list(await asyncio.gather(*(ask() for _ in range(tasks_per_loop))))

    def in_loop() -> None:
        try:
            barrier.wait(WAIT)
            values = asyncio.run(many_tasks())
            with lock:
                results.extend(values)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=in_thread) for _ in range(thread_count)]
    threads += [threading.Thread(target=in_loop) for _ in range(loop_count)]
    for t in threads:
        t.start()
    assert arrivals.wait_for(thread_count + loop_count * tasks_per_loop)
    loader.gate.set()
    for t in threads:
        t.join(WAIT)

    assert errors == []
    assert len(results) == thread_count + loop_count * tasks_per_loop
    assert loader.calls == 1
    assert all(v is results[0] for v in results)


def test_waits_contended_on_one_loop_then_on_a_new_loop() -> None:
    # The first load fails while tasks on loop 1 wait for it; the retry is awaited by tasks on
    # a second loop. Nothing may stay bound to the first loop.
    loader = Loader(gated=True, fail_on=lambda n: OSError("disk on fire") if n == 1 else None)
    holder: LazyModel[object] = LazyModel(loader)

    async def contend() -> list[object]:
        tasks = [asyncio.create_task(holder.aget()) for _ in range(5)]
        await wait_until(lambda: holder.status == "loading")
        await asyncio.sleep(0)  # let every task register as a waiter
        assert not any(t.done() for t in tasks)
        assert await anyio.to_thread.run_sync(loader.entered.wait, WAIT)
        loader.gate.set()
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    first = asyncio.run(contend())
    assert all(isinstance(r, ModelLoadError) for r in first), first
    assert holder.status == "failed"

    loader.gate.clear()
    loader.entered.clear()
    second = asyncio.run(contend())
    assert not any(isinstance(r, BaseException) for r in second), second
    assert all(v is second[0] for v in second)
    assert loader.calls == 2

    # And a third loop, on the loaded holder.
    assert asyncio.run(holder.aget()) is second[0]


def test_waiter_whose_loop_has_closed_does_not_break_the_load(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader)

    async def impatient() -> None:
        await holder.aget(timeout=0.01)

    with pytest.raises(ModelLoadTimeout):
        asyncio.run(impatient())  # its loop is closed when asyncio.run returns

    with caplog.at_level(logging.ERROR):
        loader.gate.set()
        value = holder.get()
    assert value is loader.values[0]
    assert holder.status == "loaded"
    assert "exception calling callback" not in caplog.text


@pytest.mark.anyio
async def test_failed_load_reaches_every_waiter_and_the_next_call_retries() -> None:
    cause = ModelFetchError("cannot read s3://b/k: S3 error NoSuchKey (no object has that key)")
    loader = Loader(gated=True, fail_on=lambda n: cause if n == 1 else None)
    holder: LazyModel[object] = LazyModel(loader)

    tasks = [asyncio.create_task(holder.aget()) for _ in range(10)]
    assert await anyio.to_thread.run_sync(loader.entered.wait, WAIT)
    loader.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    for result in results:
        assert isinstance(result, ModelLoadError)
        assert isinstance(result, ModelUnavailable)
        assert "NoSuchKey" in str(result)
        assert "s3://b/k" in str(result)
    assert holder.status == "failed"
    assert holder.last_error is cause
    assert holder.peek() is None
    assert (holder.loads_started, holder.loads_succeeded) == (1, 0)

    # The cause is gone: the next caller loads again and succeeds.
    value = await holder.aget()
    assert value is loader.values[0]
    assert loader.calls == 2
    assert holder.status == "loaded"
    assert holder.peek() is value
    assert holder.last_error is None
    assert (holder.loads_started, holder.loads_succeeded) == (2, 1)


def test_failed_load_is_retried_by_the_next_thread() -> None:
    loader = Loader(fail_on=lambda n: ModelFetchError("S3 error AccessDenied") if n == 1 else None)
    holder: LazyModel[object] = LazyModel(loader)
    with pytest.raises(ModelFetchError, match="AccessDenied"):
        holder.get()
    assert holder.status == "failed"
    assert holder.get() is loader.values[0]
    assert (holder.loads_started, holder.loads_succeeded) == (2, 1)


def test_other_exceptions_are_wrapped_with_their_cause() -> None:
    boom = ValueError("boom")
    holder: LazyModel[object] = LazyModel(Loader(fail_on=lambda n: boom))

    with pytest.raises(ModelLoadError) as info:
        holder.get()

    assert type(info.value) is ModelLoadError
    assert "ValueError: boom" in str(info.value)
    assert info.value.__cause__ is boom
    # Each caller gets its own copy of the load's error (see the waiters' memory tests).
    assert type(holder.last_error) is ModelLoadError
    assert str(holder.last_error) == str(info.value)
    assert holder.status == "failed"


@pytest.mark.anyio
async def test_cancelled_waiter_does_not_cancel_the_load() -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader)

    quitter = asyncio.create_task(holder.aget())
    stayers = [asyncio.create_task(holder.aget()) for _ in range(3)]
    assert await anyio.to_thread.run_sync(loader.entered.wait, WAIT)
    await asyncio.sleep(0)
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter

    assert holder.status == "loading"
    loader.gate.set()
    values = await asyncio.gather(*stayers)
    assert all(v is loader.values[0] for v in values)
    assert loader.calls == 1
    assert holder.status == "loaded"


@pytest.mark.anyio
async def test_cancel_scope_around_a_waiter_leaves_the_load_running() -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader)
    got: list[object] = []

    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def cancelled_waiter() -> None:
            with scope:
                await holder.aget()
            got.append("cancelled" if scope.cancelled_caught else "finished")

        async def patient_waiter() -> None:
            got.append(await holder.aget())

        tg.start_soon(cancelled_waiter)
        tg.start_soon(patient_waiter)
        assert await anyio.to_thread.run_sync(loader.entered.wait, WAIT)
        await anyio.sleep(0)
        scope.cancel()
        await wait_until(lambda: "cancelled" in got)
        assert holder.status == "loading"
        loader.gate.set()

    assert got == ["cancelled", loader.values[0]]
    assert loader.calls == 1


@pytest.mark.anyio
async def test_aget_timeout_raises_and_the_load_carries_on() -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader, name="digits model")

    with pytest.raises(ModelLoadTimeout) as info:
        await holder.aget(timeout=0.05)
    assert isinstance(info.value, ModelUnavailable)
    assert "digits model is still loading after 0.05s" in str(info.value)
    assert holder.status == "loading"

    loader.gate.set()
    assert await holder.aget() is loader.values[0]
    assert loader.calls == 1
    assert holder.loads_started == 1


@pytest.mark.anyio
async def test_aget_uses_the_holders_wait_by_default() -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader, wait=0.05)
    with pytest.raises(ModelLoadTimeout, match=r"after 0\.05s"):
        await holder()
    loader.gate.set()
    assert await holder() is loader.values[0]


def test_get_timeout_raises_and_the_load_carries_on() -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader)

    with pytest.raises(ModelLoadTimeout, match=r"still loading after 0\.05s"):
        holder.get(timeout=0.05)
    assert holder.status == "loading"

    loader.gate.set()
    assert holder.get() is loader.values[0]
    assert loader.calls == 1


@pytest.mark.anyio
async def test_event_loop_stays_free_while_loading() -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(200):
            await anyio.sleep(0)
            ticks += 1

    waiter = asyncio.create_task(holder.aget())
    assert await anyio.to_thread.run_sync(loader.entered.wait, WAIT)
    await ticker()

    assert ticks == 200
    assert not waiter.done()
    assert holder.status == "loading"
    loader.gate.set()
    assert await waiter is loader.values[0]


@pytest.mark.anyio
async def test_fastapi_dependency_serves_many_requests_with_one_load() -> None:
    loader = Loader(gated=True)
    holder: LazyModel[object] = LazyModel(loader)
    app = FastAPI()
    arrived = 0

    async def arrive() -> None:
        nonlocal arrived
        arrived += 1

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": holder.status}

    # Depends() as a default value: with postponed annotations FastAPI cannot resolve an
    # Annotated[..., Depends(holder)] that names a local variable.
    @app.get("/predict", dependencies=[Depends(arrive)])
    async def predict(model: object = Depends(holder)) -> dict[str, Any]:
        return {"model": id(model)}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/health")).json() == {"status": "ok", "model": "not_loaded"}

        requests = [asyncio.create_task(client.get("/predict")) for _ in range(20)]
        await wait_until(lambda: arrived == 20)
        assert await anyio.to_thread.run_sync(loader.entered.wait, WAIT)

        during = await client.get("/health")
        assert during.status_code == 200
        assert during.json() == {"status": "ok", "model": "loading"}
        assert not any(r.done() for r in requests)

        loader.gate.set()
        responses = await asyncio.gather(*requests)

        assert [r.status_code for r in responses] == [200] * 20
        assert {r.json()["model"] for r in responses} == {id(loader.values[0])}
        assert loader.calls == 1
        assert (await client.get("/health")).json() == {"status": "ok", "model": "loaded"}


def test_waiters_of_a_failed_load_leave_nothing_behind() -> None:
    """50 callers holding 1 MB each wait for a load that fails: once they have all been told,
    their memory is free again, although the failed load is kept (for /model) until a retry."""
    import tracemalloc

    loader = Loader(gated=True, fail_on=lambda n: ModelFetchError("cannot read s3://b/k"))
    holder: LazyModel[object] = LazyModel(loader, wait=WAIT)
    errors: list[BaseException] = []
    arrivals = Arrivals()

    def waiter() -> None:
        payload = bytearray(1024 * 1024)  # what a request holds while it waits
        try:
            arrivals.arrive()
            holder.get()
        except ModelUnavailable as exc:
            errors.append(type(exc)(str(exc)))
        del payload

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        threads = [threading.Thread(target=waiter) for _ in range(50)]
        for thread in threads:
            thread.start()
        assert arrivals.wait_for(50)
        loader.gate.set()
        for thread in threads:
            thread.join(WAIT)
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(errors) == 50
    assert holder.status == "failed"
    assert retained < 2 * 1024 * 1024, retained  # not 50 MB


@pytest.mark.anyio
async def test_async_waiters_of_a_failed_load_get_their_own_error() -> None:
    loader = Loader(gated=True, fail_on=lambda n: ModelFetchError("cannot read s3://b/k"))
    holder: LazyModel[object] = LazyModel(loader, wait=WAIT)
    seen: list[BaseException] = []

    async def waiter() -> None:
        try:
            await holder.aget()
        except ModelFetchError as exc:
            seen.append(exc)

    async with anyio.create_task_group() as group:
        for _ in range(5):
            group.start_soon(waiter)
        await wait_until(lambda: loader.entered.is_set())
        loader.gate.set()
    assert len({id(e) for e in seen}) == 5  # five errors, not one shared and growing
    assert all(str(e) == "cannot read s3://b/k" for e in seen)
    assert holder.last_error is not None and holder.last_error.__traceback__ is None


# -- failures no retry changes (a bad file, a failed digest, no fit, no object) ----------------


class Recheck:
    """A recheck hook: answers `changed`, counts its calls, can be held at a gate."""

    def __init__(self, *, changed: bool = False, gated: bool = False) -> None:
        self.changed = changed
        self.calls: list[BaseException] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, error: ModelUnavailable) -> bool:
        self.calls.append(error)
        self.entered.set()
        assert self.gate.wait(WAIT)
        return self.changed


def fails_first(error: BaseException) -> Loader:
    return Loader(fail_on=lambda n: error if n == 1 else None)


PERMANENT = [
    ModelFormatError("s3://b/k: the weights do not fit the model (3 shapes differ)"),
    ModelIntegrityError("s3://b/k: sha256 is 9f86d0 but LAZYSERVE_MODEL_SHA256 says 2c26b4"),
    ModelTooLarge("s3://b/k is 9 GB; the function's memory is 3 GB"),
    ModelMissing("s3://b/k: S3 error NoSuchKey"),
    ModelFetchError("s3://b/k: S3 error AccessDenied (grant s3:GetObject)", retryable=False),
]


@pytest.mark.anyio
@pytest.mark.parametrize("error", PERMANENT, ids=lambda e: type(e).__name__)
async def test_a_failure_no_retry_changes_is_loaded_once_then_answered_from_memory(
    error: ModelUnavailable,
) -> None:
    loader = fails_first(error)
    recheck = Recheck(changed=True)
    holder: LazyModel[object] = LazyModel(loader, recheck=recheck, recheck_every=3600)

    seen: list[BaseException] = []
    for ask in (holder.get, holder.aget, holder.get, holder.aget):
        with pytest.raises(type(error)) as info:
            result = ask()
            if asyncio.iscoroutine(result):
                await result
        seen.append(info.value)

    assert loader.calls == 1  # one download, not one per request
    assert [str(e) for e in seen] == [str(error)] * 4
    assert len({id(e) for e in seen}) == 4  # each request its own copy
    assert holder.status == "failed"
    assert holder.failure is error
    assert (holder.loads_started, holder.loads_succeeded) == (1, 0)
    assert recheck.calls == []  # not due within the interval


@pytest.mark.anyio
async def test_the_recheck_runs_off_the_request_path_and_a_changed_object_loads_again() -> None:
    error = ModelFormatError("s3://b/k: not a safetensors file")
    loader = fails_first(error)
    recheck = Recheck(changed=True, gated=True)
    holder: LazyModel[object] = LazyModel(loader, recheck=recheck, recheck_every=0)

    with pytest.raises(ModelFormatError):
        await holder.aget()
    # Due at once (interval 0): this request starts the recheck and is answered without it.
    with pytest.raises(ModelFormatError):
        await holder.aget()
    assert await anyio.to_thread.run_sync(recheck.entered.wait, WAIT)
    with pytest.raises(ModelFormatError):  # one recheck at a time; still no load
        await holder.aget()
    assert len(recheck.calls) == 1 and recheck.calls[0] is error
    assert loader.calls == 1
    assert holder.status == "failed"

    recheck.gate.set()
    await wait_until(lambda: holder.failure is None)
    assert holder.rechecks == 1
    assert await holder.aget() is loader.values[0]
    assert loader.calls == 2
    assert holder.status == "loaded"


def test_an_unchanged_object_stays_remembered_through_its_rechecks() -> None:
    loader = fails_first(ModelIntegrityError("s3://b/k: sha256 differs"))
    recheck = Recheck(changed=False)
    holder: LazyModel[object] = LazyModel(loader, recheck=recheck, recheck_every=0)
    for done in range(1, 4):
        with pytest.raises(ModelIntegrityError):
            holder.get()
        assert anyio.run(wait_for_rechecks, holder, done - 1)
    assert loader.calls == 1
    assert holder.status == "failed"
    assert holder.failure is not None


async def wait_for_rechecks(holder: LazyModel[object], count: int) -> bool:
    await wait_until(lambda: holder.rechecks >= count)
    return True


def test_a_recheck_that_raises_keeps_the_failure_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loader = fails_first(ModelFormatError("s3://b/k: not a safetensors file"))

    def recheck(error: ModelUnavailable) -> bool:
        raise ModelFetchError("s3://b/k: S3 error SlowDown")

    holder: LazyModel[object] = LazyModel(
        loader, name="digits model", recheck=recheck, recheck_every=0
    )
    for _ in range(2):
        with pytest.raises(ModelFormatError):
            holder.get()
    assert anyio.run(wait_for_rechecks, holder, 1)
    assert loader.calls == 1
    assert holder.failure is not None
    assert (
        "digits model: cannot tell whether the object behind the failed load changed: "
        "s3://b/k: S3 error SlowDown"
    ) in caplog.text


def test_without_a_recheck_a_remembered_failure_is_loaded_again_once_per_interval() -> None:
    loader = fails_first(ModelFormatError("s3://b/k: not a safetensors file"))
    holder: LazyModel[object] = LazyModel(loader, recheck_every=3600)
    for _ in range(3):
        with pytest.raises(ModelFormatError):
            holder.get()
    assert loader.calls == 1
    holder.recheck_every = 0  # the interval has passed
    assert holder.get() is loader.values[0]
    assert loader.calls == 2


def test_forget_lets_the_next_request_load_and_swap_clears_the_failure() -> None:
    error = ModelFormatError("s3://b/k: not a safetensors file")
    loader = Loader(fail_on=lambda n: error if n in (1, 2) else None)
    holder: LazyModel[object] = LazyModel(loader, recheck_every=3600)
    with pytest.raises(ModelFormatError):
        holder.get()
    assert not holder.forget(ModelFormatError("another error"))  # only the one remembered
    assert holder.forget(error)
    with pytest.raises(ModelFormatError):
        holder.get()  # loaded again (and failed again)
    assert loader.calls == 2

    fresh = object()
    holder.swap(fresh)  # a refresh's new version
    assert holder.failure is None
    assert holder.get() is fresh
    assert loader.calls == 2


def test_a_retryable_failure_is_not_remembered() -> None:
    loader = fails_first(ModelFetchError("s3://b/k: S3 error SlowDown", retryable=True))
    holder: LazyModel[object] = LazyModel(loader, recheck_every=3600)
    with pytest.raises(ModelFetchError):
        holder.get()
    assert holder.failure is None
    assert holder.status == "failed"
    assert holder.get() is loader.values[0]
    assert loader.calls == 2


# -- load slots shared by many holders ---------------------------------------------------------


def test_a_load_queued_for_a_slot_starts_no_thread_and_is_withdrawn_when_nobody_waits() -> None:
    slots = LoadSlots(1)
    busy_loader = Loader(gated=True)
    busy: LazyModel[object] = LazyModel(busy_loader, slots=slots, name="busy model")
    queued_loader = Loader()
    queued: LazyModel[object] = LazyModel(queued_loader, slots=slots, name="queued model")
    busy.start()
    assert busy_loader.entered.wait(WAIT)

    with pytest.raises(ModelLoadTimeout) as info:
        queued.get(timeout=0.05)
    assert str(info.value) == (
        "the queued model did not start loading within 0.05s: other models are loading (at "
        "most 1 at once); retry shortly"
    )
    assert queued_loader.calls == 0
    assert not any(t.name == "lazyserve-load-queued model" for t in threading.enumerate())
    assert (queued.status, queued.loads_started) == ("not_loaded", 0)

    busy_loader.gate.set()
    assert busy.get() is busy_loader.values[0]
    assert queued_loader.calls == 0  # withdrawn: the freed slot did not start it
    assert queued.get() is queued_loader.values[0]  # a later request loads it


def test_a_queued_load_one_waiter_gave_up_on_runs_for_the_one_still_waiting() -> None:
    slots = LoadSlots(1)
    busy_loader = Loader(gated=True)
    busy: LazyModel[object] = LazyModel(busy_loader, slots=slots)
    queued_loader = Loader()
    queued: LazyModel[object] = LazyModel(queued_loader, slots=slots)
    busy.start()
    assert busy_loader.entered.wait(WAIT)
    arrivals = Arrivals()
    got: list[object] = []

    def patient() -> None:
        arrivals.arrive()
        got.append(queued.get())

    thread = threading.Thread(target=patient)
    thread.start()
    assert arrivals.wait_for(1)
    anyio.run(wait_until, lambda: queued.status == "loading")  # queued, for the patient one
    with pytest.raises(ModelLoadTimeout):
        queued.get(timeout=0.05)
    busy_loader.gate.set()
    thread.join(WAIT)
    assert got == queued_loader.values
    assert queued_loader.calls == 1
