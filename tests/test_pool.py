"""ModelPool: many models under a memory budget, with a stand-in load that reserves its size and
counts what it loads (no S3 here; tests/test_many_models.py runs the real thing)."""

from __future__ import annotations

import gc
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from lazyserve.errors import ModelMissing, ModelNotFound, ModelTooLarge
from lazyserve.pool import ModelPool

SIZE = 100
WAIT = 10.0


class Loads:
    """A load function: reserves SIZE (or `sizes[name]`) bytes, counts loads per name, can be
    held at a gate, and raises ModelMissing for names in `missing`."""

    def __init__(self, sizes: dict[str, int] | None = None, missing: set[str] | None = None):
        self.sizes = sizes or {}
        self.missing = missing or set()
        self.count: Counter[str] = Counter()
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def __call__(self, name: str, reserve: Callable[[int], None]) -> Any:
        if name in self.missing:
            raise ModelMissing(f"s3://b/p/{name}.safetensors: S3 error NoSuchKey")
        reserve(self.sizes.get(name, SIZE))
        assert self.gate.wait(WAIT)
        with self._lock:
            self.count[name] += 1
        return SimpleNamespace(name=name, info=SimpleNamespace(sha256=f"sha-{name}"))


def check(name: str) -> None:
    if not name.isalnum():
        raise ModelNotFound(f"model name {name!r} is not accepted")


def pool(loads: Loads, budget: int | None = 3 * SIZE) -> ModelPool[Any]:
    return ModelPool(loads, check=check, budget=budget, wait=WAIT)


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


def test_refresh_reservations_count_against_the_budget() -> None:
    models = pool(Loads(), budget=3 * SIZE)
    with models.lease("a"), models.lease("b"):
        pass
    assert models.reserve_extra(SIZE)  # a new copy of "a" beside the old: 300 of 300
    assert not models.reserve_extra(1)
    (entry,) = [e for e in models.entries() if e.name == "a"]
    models.swapped(entry, SIZE)  # the new version serves; the old one's bytes go back
    assert models.describe()["resident_bytes"] == 2 * SIZE
    assert models.reserve_extra(SIZE)  # a refresh that then fails gives its bytes back
    models.release_extra(SIZE)
    assert models.describe()["resident_bytes"] == 2 * SIZE
    assert models.describe()["peak_resident_bytes"] == 3 * SIZE


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
