"""ModelPool: many models under a memory budget, with a stand-in load that reserves its size and
counts what it loads (no S3 here; tests/test_many_models.py runs the real thing)."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from lazyserve.errors import (
    ModelFetchError,
    ModelFormatError,
    ModelLoadTimeout,
    ModelMissing,
    ModelNotFound,
    ModelTooLarge,
    ModelUnavailable,
)
from lazyserve.pool import ModelPool
from tests.helpers import wait_until

SIZE = 100
WAIT = 10.0


class Loads:
    """A load function: reserves SIZE (or `sizes[name]`) bytes, counts loads per name, can be
    held at a gate, raises ModelMissing for names in `missing` and, once it has reserved,
    `failing(name)` when that gives an error. `started` counts the loads that began."""

    def __init__(
        self,
        sizes: dict[str, int] | None = None,
        missing: set[str] | None = None,
        failing: Callable[[str], BaseException | None] = lambda name: None,
    ):
        self.sizes = sizes or {}
        self.missing = missing or set()
        self.failing = failing
        self.count: Counter[str] = Counter()
        self.started: Counter[str] = Counter()
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def __call__(self, name: str, reserve: Callable[[int], None]) -> Any:
        with self._lock:
            self.started[name] += 1
        if name in self.missing:
            raise ModelMissing(f"s3://b/p/{name}.safetensors: S3 error NoSuchKey")
        reserve(self.sizes.get(name, SIZE))
        assert self.gate.wait(WAIT)
        error = self.failing(name)
        if error is not None:
            raise error
        with self._lock:
            self.count[name] += 1
        return SimpleNamespace(name=name, info=SimpleNamespace(sha256=f"sha-{name}"))


def check(name: str) -> None:
    if not name.isalnum():
        raise ModelNotFound(f"model name {name!r} is not accepted")


def pool(loads: Loads, budget: int | None = 3 * SIZE, **options: Any) -> ModelPool[Any]:
    return ModelPool(loads, check=check, budget=budget, **{"wait": WAIT, **options})


def test_least_recently_used_idle_models_are_evicted_past_the_budget() -> None:
    loads = Loads()
    models = pool(loads)
    for name in ["a", "b", "c", "a", "d"]:  # "b" is the least recently used when "d" comes
        with models.lease(name) as loaded:
            assert loaded.name == name
    described = models.describe()
    assert [m["name"] for m in described["models"]] == ["a", "c", "d"]
    assert described["resident_bytes"] == 3 * SIZE
    assert described["peak_resident_bytes"] <= 3 * SIZE
    assert described["evictions"] == 1
    assert loads.count == {"a": 1, "b": 1, "c": 1, "d": 1}  # "a" stayed resident: one load
    with models.lease("b"):
        pass
    assert loads.count["b"] == 2  # loaded again once evicted


def test_a_model_in_use_is_never_evicted_and_a_load_waits_for_room() -> None:
    loads = Loads()
    models = pool(loads, budget=2 * SIZE)
    released = threading.Event()
    held = threading.Semaphore(0)
    order: list[str] = []

    def hold(name: str) -> None:
        with models.lease(name):
            order.append(f"holding {name}")
            held.release()
            assert released.wait(WAIT)
        order.append(f"released {name}")

    holders = [threading.Thread(target=hold, args=(n,)) for n in ("a", "b")]
    for thread in holders:
        thread.start()
    assert held.acquire(timeout=WAIT) and held.acquire(timeout=WAIT)
    done = threading.Event()

    def third() -> None:
        with models.lease("c"):
            order.append("holding c")
        done.set()

    waiter = threading.Thread(target=third)
    waiter.start()
    # No room while a and b are in use: c's load waits (a count, not a time: c cannot have
    # been served in the meantime, whatever the wait).
    assert not done.wait(0.2)
    assert models.describe()["resident_bytes"] == 2 * SIZE
    released.set()
    assert done.wait(WAIT)
    for thread in [*holders, waiter]:
        thread.join(WAIT)
    assert order.index("holding c") > order.index("released a") or order.index(
        "holding c"
    ) > order.index("released b")
    assert models.describe()["peak_resident_bytes"] <= 2 * SIZE


def test_concurrent_requests_for_one_model_share_one_load() -> None:
    loads = Loads()
    loads.gate.clear()
    models = pool(loads)
    results: list[Any] = []

    def ask() -> None:
        with models.lease("a") as loaded:
            results.append(loaded)

    threads = [threading.Thread(target=ask) for _ in range(10)]
    for thread in threads:
        thread.start()
    loads.gate.set()
    for thread in threads:
        thread.join(WAIT)
    assert [r.name for r in results] == ["a"] * 10
    assert loads.count["a"] == 1


def test_a_model_bigger_than_the_whole_budget_is_refused_before_it_loads() -> None:
    loads = Loads(sizes={"big": 4 * SIZE})
    models = pool(loads)
    with models.lease("a"):
        pass
    with pytest.raises(ModelTooLarge) as info, models.lease("big"):
        pass
    assert str(info.value) == (
        f"model 'big' is {4 * SIZE} bytes, more than the whole memory budget of {3 * SIZE} "
        "bytes (LAZYSERVE_MEMORY_BUDGET, or what the function's memory leaves after the "
        "imports); raise MemorySize or the budget"
    )
    assert loads.count["big"] == 0
    assert models.describe()["resident_bytes"] == SIZE  # "a" was not evicted for nothing
    with models.lease("a"):
        pass
    assert loads.count["a"] == 1


def test_names_that_cannot_exist_and_missing_models_are_not_found() -> None:
    loads = Loads(missing={"gone"})
    models = pool(loads)
    with pytest.raises(ModelNotFound, match="is not accepted"), models.lease("../etc"):
        pass
    with pytest.raises(ModelNotFound) as info, models.lease("gone"):
        pass
    assert str(info.value).startswith("no model named 'gone': ")
    with models.lease("a") as loaded:  # the others keep serving
        assert loaded.name == "a"
    assert [m["name"] for m in models.describe()["models"]] == ["a"]  # nothing kept for "gone"
    assert models.describe()["resident_bytes"] == SIZE


@pytest.mark.anyio
async def test_async_leases_release_the_model_when_the_request_ends() -> None:
    loads = Loads()
    models = pool(loads, budget=SIZE)
    async with models.alease("a") as loaded:
        assert loaded.name == "a"
        assert models.describe()["models"][0]["in_use"] == 1
    assert models.describe()["models"][0]["in_use"] == 0
    async with models.alease("b"):  # "a" is idle again: evicted for "b"
        pass
    assert models.describe()["evictions"] == 1
    with pytest.raises(ModelNotFound):
        async with models.alease("no-such!"):
            pass


def test_an_evicted_model_is_freed_at_once_not_by_the_cycle_collector() -> None:
    class Weights:  # stands in for a loaded model: something that can be weakly referenced
        def __init__(self, name: str) -> None:
            self.name = name
            self.info = SimpleNamespace(sha256=f"sha-{name}")

    def load(name: str, reserve: Callable[[int], None]) -> Any:
        reserve(SIZE)
        return Weights(name)

    models = ModelPool(load, check=check, budget=SIZE, wait=WAIT)
    gc.disable()
    try:
        with models.lease("a") as loaded:
            first = weakref.ref(loaded)
        del loaded
        with models.lease("b"):  # evicts "a"
            pass
        assert first() is None  # freed by reference counting alone
    finally:
        gc.enable()


def load_threads() -> int:
    return sum(t.name.startswith("lazyserve-load-") for t in threading.enumerate())


# -- failures no retry changes -----------------------------------------------------------------


def test_a_model_that_cannot_load_is_downloaded_once_and_health_says_failed() -> None:
    bad = ModelFormatError("s3://b/p/bad.safetensors: the weights do not fit the model")
    loads = Loads(failing=lambda name: bad if name == "bad" else None)
    asked: list[tuple[str, BaseException]] = []

    def recheck(name: str, error: ModelUnavailable) -> bool:
        asked.append((name, error))
        return False

    models = pool(loads, recheck=recheck, recheck_every=3600)
    for _ in range(4):
        with pytest.raises(ModelFormatError, match="do not fit the model"), models.lease("bad"):
            pass
    assert loads.started["bad"] == 1  # one download, not four
    assert models.status() == "failed"
    (listed,) = models.describe()["models"]
    assert (listed["status"], listed["size_bytes"]) == ("failed", 0)
    assert listed["last_error"] == str(bad)
    assert models.describe()["resident_bytes"] == 0  # a failed model holds no budget
    assert asked == []  # not due yet

    models.recheck_every = 0  # for models taken on from now: "bad2" is rechecked at once
    loads.failing = lambda name: bad if name.startswith("bad") else None
    with pytest.raises(ModelFormatError), models.lease("bad2"):
        pass
    with pytest.raises(ModelFormatError), models.lease("bad2"):
        pass
    anyio.run(wait_until, lambda: len(asked) == 1)
    assert asked[0][0] == "bad2" and isinstance(asked[0][1], ModelFormatError)

    with models.lease("a"):
        pass
    assert models.status() == "loaded"


def test_a_busy_budget_is_retryable_and_not_remembered() -> None:
    loads = Loads()
    models = pool(loads, budget=SIZE, wait=0.05)
    with models.lease("a"):
        # The request's wait and the load's wait for room are both 0.05 s: either ends first.
        with pytest.raises(ModelUnavailable) as first, models.lease("b"):
            pass
        assert first.value.retryable
        (b,) = [e for e in models.entries() if e.name == "b"]
        with pytest.raises(ModelTooLarge) as info:
            b.holder.get(timeout=WAIT)  # outwaits the load's wait for room
    assert info.value.retryable
    assert str(info.value) == (
        f"model 'b' ({SIZE} bytes) does not fit in the memory budget of {SIZE} bytes while "
        f"models in use hold {SIZE} bytes (a); retry shortly"
    )
    with models.lease("b") as loaded:  # "a" is idle now: the next request loads "b"
        assert loaded.name == "b"


# -- many names: failed ones expire, the pool stays bounded ----------------------------------------


@pytest.mark.parametrize("retryable", [True, False], ids=["retryable", "remembered"])
def test_a_flood_of_names_that_fail_keeps_the_pool_bounded(retryable: bool) -> None:
    denied = ModelFetchError("S3 error AccessDenied (grant s3:GetObject)", retryable=retryable)
    loads = Loads(failing=lambda name: denied)
    models = pool(loads, max_models=16, forget_failed_after=3600)
    for i in range(1000):
        with pytest.raises(ModelFetchError), models.lease(f"m{i}"):
            pass
    described = models.describe()
    assert len(described["models"]) == 16
    assert [m["name"] for m in described["models"]][-1] == "m999"  # the newest stayed
    assert described["resident_bytes"] == 0
    assert sum(loads.started.values()) == 1000


def test_failed_models_are_dropped_after_a_while_and_loaded_ones_stay() -> None:
    loads = Loads(
        failing=lambda name: ModelFetchError("S3 error SlowDown") if "x" in name else None
    )
    models = pool(loads, forget_failed_after=3600)
    with pytest.raises(ModelFetchError), models.lease("x1"):
        pass
    with models.lease("a"):
        pass
    assert [m["name"] for m in models.describe()["models"]] == ["a", "x1"]

    models.forget_failed_after = 0  # the while has passed
    with pytest.raises(ModelFetchError), models.lease("x2"):
        pass
    assert [m["name"] for m in models.describe()["models"]] == ["a"]  # loaded: it stays
    assert models.describe()["resident_bytes"] == SIZE


def test_past_the_most_names_the_least_recently_used_idle_model_makes_way() -> None:
    loads = Loads()
    models = pool(loads, budget=None, max_models=2)
    for name in ("a", "b", "a", "c"):
        with models.lease(name):
            pass
    described = models.describe()
    assert [m["name"] for m in described["models"]] == ["a", "c"]
    assert described["evictions"] == 1
    assert described["resident_bytes"] == 2 * SIZE


def test_past_the_most_names_with_every_model_in_use_a_new_name_is_a_retryable_503() -> None:
    models = pool(Loads(), budget=None, max_models=2)
    with models.lease("a"), models.lease("b"):
        with pytest.raises(ModelUnavailable) as info, models.lease("c"):
            pass
    assert info.value.retryable
    assert str(info.value) == (
        "model 'c' cannot be taken on now: the 2 models the pool holds at most are all in use "
        "or loading; retry shortly"
    )
    with models.lease("c"):
        pass


# -- how many load at once -------------------------------------------------------------------


@pytest.mark.anyio
async def test_at_most_loads_at_once_models_load_the_others_queue_without_a_thread() -> None:
    loads = Loads()
    loads.gate.clear()
    models = pool(loads, budget=None, loads_at_once=2)
    await wait_until(lambda: load_threads() == 0)  # an earlier test's threads have ended

    async def ask(name: str) -> str:
        async with models.alease(name) as loaded:
            return str(loaded.name)

    tasks = [asyncio.create_task(ask(f"m{i}")) for i in range(10)]
    await wait_until(lambda: sum(loads.started.values()) == 2)
    described = models.describe()
    assert (described["loads_running"], described["loads_queued"]) == (2, 8)
    assert load_threads() == 2
    assert {m["status"] for m in described["models"]} == {"loading"}

    loads.gate.set()
    assert sorted(await asyncio.gather(*tasks)) == sorted(f"m{i}" for i in range(10))
    assert sum(loads.count.values()) == 10
    await wait_until(lambda: load_threads() == 0)


@pytest.mark.anyio
async def test_a_load_that_finds_no_slot_in_its_wait_is_a_retryable_503_and_is_dropped() -> None:
    loads = Loads()
    loads.gate.clear()
    models = pool(loads, budget=None, loads_at_once=1, wait=0.2)
    await wait_until(lambda: load_threads() == 0)  # an earlier test's threads have ended

    async def ask(name: str) -> BaseException | None:
        try:
            async with models.alease(name):
                return None
        except ModelUnavailable as exc:
            return exc

    # 200 names at once against an endpoint that trickles: one load runs, the rest wait for
    # the slot within their wait, then answer 503; no thread per name piles up.
    answers = await asyncio.gather(*(ask(f"m{i}") for i in range(200)))
    assert all(isinstance(a, ModelLoadTimeout) and a.retryable for a in answers)
    assert str(answers[0]) == (
        "the model 'm0' is still loading after 0.2s; the load carries on, retry shortly"
    )
    assert str(answers[1]) == (
        "the model 'm1' did not start loading within 0.2s: other models are loading (at most 1 "
        "at once); retry shortly"
    )
    assert load_threads() == 1
    assert models.describe()["loads_queued"] == 0  # nobody waits for them: withdrawn

    loads.gate.set()
    await wait_until(lambda: load_threads() == 0)
    assert sum(loads.started.values()) == 1  # only the one that had the slot ran
    statuses = {m["name"]: m["status"] for m in models.describe()["models"]}
    assert statuses["m0"] == "loaded"
    assert set(statuses.values()) == {"loaded", "not_loaded"}
    async with models.alease("m1") as loaded:  # a later request loads it
        assert loaded.name == "m1"
