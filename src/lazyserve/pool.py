"""Many models from one prefix, each loaded on first use (single-flight, as one model is), held
under a memory budget: a load reserves the size it reads before it downloads, idle models are
evicted least recently used first, a model in use by a request is never freed under it, a few
models load at once, and the pool keeps a bounded number of names."""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from lazyserve.errors import ModelMissing, ModelNotFound, ModelTooLarge, ModelUnavailable
from lazyserve.lazy import RECHECK_SECONDS, LazyModel, Status
from lazyserve.model import Loaded
from lazyserve.slots import LoadSlots

__all__ = ["FORGET_FAILED_AFTER", "LOADS_AT_ONCE", "MAX_MODELS", "ModelPool", "PoolEntry"]

T = TypeVar("T", bound=Loaded[Any])
log = logging.getLogger("lazyserve")

# A load of `name` that reserves bytes through `reserve(size)` before it reads them.
Load = Callable[[str, Callable[[int], None]], T]
Check = Callable[[str], None]  # raises ModelNotFound for a name that cannot exist
# recheck(name, error): may the object behind model `name`'s failed load have changed?
PoolRecheck = Callable[[str, ModelUnavailable], bool]

MAX_MODELS = 256
"""Names the pool holds at once, loaded, loading or failed: a flood of names cannot grow it. A
new name past the limit takes the place of the failed or idle model used least recently; when
every one is in use or loading, its request gets the retryable 503."""
LOADS_AT_ONCE = 4
"""Loads a pool runs at once, each a thread with its connections and its buffer. A load beyond
the limit queues without a thread; its request waits for a slot within LAZYSERVE_LOAD_WAIT or
gets the retryable 503, and a queued load nobody waits for any more is dropped."""
FORGET_FAILED_AFTER = 300.0
"""Seconds a failed model (neither loaded nor loading, not in use) stays in the pool after its
last request. A remembered failure goes with it: a name still asked for keeps its memory, a
name nobody asks for costs nothing."""


@dataclass
class PoolEntry(Generic[T]):
    """One model of the pool: its holder and what the budget and `GET /models` need."""

    name: str
    holder: LazyModel[T]
    size: int = 0  # bytes reserved for the version it serves (or is loading)
    pending: int = 0  # bytes reserved for a new version a refresh loads beside it
    refreshing: bool = False  # a refresh holds it: not evicted until it ends
    in_use: int = 0  # requests holding it now
    hits: int = 0
    last_used: float = field(default_factory=time.time)
    loaded_once: bool = False

    def describe(self) -> dict[str, Any]:
        loaded = self.holder.peek()
        error = self.holder.last_error
        return {
            "name": self.name,
            "status": self.holder.status,
            "size_bytes": self.size,
            "sha256": loaded.info.sha256 if loaded is not None else None,
            "hits": self.hits,
            "in_use": self.in_use,
            "last_used": datetime.fromtimestamp(self.last_used, UTC).isoformat(
                timespec="milliseconds"
            ),
            "last_error": str(error) if error is not None and loaded is None else None,
        }


class ModelPool(Generic[T]):
    """Models by name; `lease(name)` / `alease(name)` give one loaded model for the duration of
    a request. `recheck(name, error)` is each model's recheck hook (see lazy.RECHECK_SECONDS)."""

    def __init__(
        self,
        load: Load[T],
        *,
        check: Check,
        budget: int | None,
        wait: float = 25.0,
        recheck: PoolRecheck | None = None,
        recheck_every: float = RECHECK_SECONDS,
        max_models: int = MAX_MODELS,
        loads_at_once: int = LOADS_AT_ONCE,
        forget_failed_after: float = FORGET_FAILED_AFTER,
    ) -> None:
        self._load = load
        self._check = check
        self.budget = budget
        self.wait = wait
        self._recheck = recheck
        self.recheck_every = recheck_every
        self.max_models = max_models
        self.forget_failed_after = forget_failed_after
        self._slots = LoadSlots(loads_at_once)
        self._entries: dict[str, PoolEntry[T]] = {}
        # Bytes of the weights resident or being read: the sum of every entry's size and
        # pending, changed only by _book, so it cannot drift from what the entries hold.
        self.reserved = 0
        self.peak_reserved = 0
        self.evictions = 0
        # One lock for the entries and the budget (a Condition: a load waiting for room wakes
        # when a request lets go of a model or a load gives its reservation back).
        self._cond = threading.Condition()

    # -- what requests use ---------------------------------------------------------------------

    @contextmanager
    def lease(self, name: str) -> Iterator[T]:
        """The loaded model `name`, kept resident until the block ends (threads)."""
        entry = self._take(name)
        try:
            yield self._outcome(entry, lambda: entry.holder.get())
        finally:
            self._give_back(entry)

    @asynccontextmanager
    async def alease(self, name: str) -> AsyncIterator[T]:
        """The loaded model `name`, kept resident until the block ends (async)."""
        entry = self._take(name)
        try:
            try:
                loaded = await entry.holder.aget()
            except ModelMissing as exc:
                self._forget(entry)
                raise ModelNotFound(f"no model named {name!r}: {exc}") from None
            yield loaded
        finally:
            self._give_back(entry)

    def status(self) -> Status:
        """For `GET /health`: `loaded` once any model is resident, else `failed` while a failure
        is remembered, else `not_loaded`."""
        with self._cond:
            entries = list(self._entries.values())
        if any(e.holder.status == "loaded" for e in entries):
            return "loaded"
        if any(e.holder.failure is not None for e in entries):
            return "failed"
        return "not_loaded"

    def describe(self) -> dict[str, Any]:
        """What `GET /models` shows: the budget and every model the pool holds."""
        with self._cond:
            self._sweep()
            entries = [e.describe() for e in self._entries.values()]
            return {
                "budget_bytes": self.budget,
                "resident_bytes": self.reserved,
                "peak_resident_bytes": self.peak_reserved,
                "evictions": self.evictions,
                "loads_running": self._slots.running,
                "loads_queued": self._slots.queued,
                "models": sorted(entries, key=lambda e: e["name"]),
            }

    def entries(self) -> list[PoolEntry[T]]:
        with self._cond:
            return list(self._entries.values())

    # -- what a refresh uses ---------------------------------------------------------------------

    def reserve_beside(self, entry: PoolEntry[T], size: int) -> None:
        """Hold `size` bytes for a new version of `entry` loaded beside the current one,
        evicting idle models (never one in use, never `entry`), or raise ModelTooLarge. Called
        again with the size the reload reads, it books that instead; `swapped` or `abandoned`
        ends the refresh, which keeps `entry` from being evicted until then."""
        budget = self.budget
        with self._cond:
            if self._entries.get(entry.name) is not entry or entry.holder.status != "loaded":
                raise ModelUnavailable(f"model {entry.name!r} is no longer loaded; not refreshed")
            entry.refreshing = True
            self._book(entry, pending=0)
            if budget is None:
                self._book(entry, pending=size)
                return
            if entry.size + size > budget:
                raise ModelTooLarge(
                    f"model {entry.name!r}: {entry.size} + {size} bytes (current and new version) "
                    f"exceed the memory budget of {budget} bytes"
                )
            idle = self._idle(exclude=entry)
            if self.reserved - sum(e.size for e in idle) + size > budget:
                # Evicting every idle model would not make room: evict none of them for nothing.
                raise ModelTooLarge(
                    f"model {entry.name!r}: {size} more bytes do not fit in the memory budget of "
                    f"{budget} bytes while models in use hold {self.reserved} bytes",
                    retryable=True,
                )
            while self.reserved + size > budget and self._evict_one(exclude=entry):
                pass
            self._book(entry, pending=size)

    def swapped(self, entry: PoolEntry[T], size: int) -> None:
        """`entry` serves a new version of `size` bytes: it is booked at that size and its old
        version's bytes go back (requests still holding the old version finish first, outside
        any reservation, for at most one request's time)."""
        with self._cond:
            entry.refreshing = False
            kept = self._entries.get(entry.name) is entry
            self._book(entry, size=size if kept else 0, pending=0)
            self._cond.notify_all()

    def abandoned(self, entry: PoolEntry[T]) -> None:
        """The refresh of `entry` ended without a swap: its new version's bytes go back."""
        with self._cond:
            entry.refreshing = False
            self._book(entry, pending=0)
            self._cond.notify_all()

    # -- bookkeeping -----------------------------------------------------------------------------

    def _book(
        self, entry: PoolEntry[T], *, size: int | None = None, pending: int | None = None
    ) -> None:
        """The one place `reserved` changes: by the difference between what `entry` held and
        what it holds now. With the lock held."""
        if size is not None:
            self.reserved += size - entry.size
            entry.size = size
        if pending is not None:
            self.reserved += pending - entry.pending
            entry.pending = pending
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def _take(self, name: str) -> PoolEntry[T]:
        self._check(name)  # a name that cannot exist is a 404 without an S3 call
        with self._cond:
            entry = self._entries.get(name)
            if entry is None:
                self._sweep()
                self._make_space(name)
                entry = self._entries[name] = self._new_entry(name)
            entry.in_use += 1
            entry.hits += 1
            entry.last_used = time.time()
            return entry

    def _new_entry(self, name: str) -> PoolEntry[T]:
        # The holder's load finds its entry through a weak reference: entry -> holder -> load
        # -> entry would be a cycle, and an evicted model (gigabytes, maybe) would then wait
        # for the cycle collector instead of being freed when its entry goes.
        entry_ref: weakref.ref[PoolEntry[T]]

        def load() -> T:
            entry = entry_ref()
            if entry is None:  # evicted while its load was being started
                raise ModelUnavailable(f"model {name!r} was evicted; retry")
            return self._run(entry)

        recheck = functools.partial(self._recheck, name) if self._recheck is not None else None
        holder = LazyModel(
            load,
            wait=self.wait,
            name=f"model {name!r}",
            recheck=recheck,
            recheck_every=self.recheck_every,
            slots=self._slots,
        )
        entry = PoolEntry(name, holder)
        entry_ref = weakref.ref(entry)
        return entry

    def _sweep(self) -> None:
        """Drop failed models nobody asked for in `forget_failed_after` seconds. Lock held."""
        expired = time.time() - self.forget_failed_after
        for entry in list(self._entries.values()):
            if entry.in_use == 0 and entry.last_used <= expired and _failed(entry):
                self._drop(entry)

    def _make_space(self, name: str) -> None:
        """Room for one more name under `max_models`: drop the failed or never-loaded idle
        model used least recently, else evict the least recently used idle loaded one."""
        while len(self._entries) >= self.max_models:
            idle = [e for e in self._entries.values() if e.in_use == 0 and not e.refreshing]
            unloaded = [e for e in idle if e.holder.status in ("failed", "not_loaded")]
            if unloaded:
                self._drop(min(unloaded, key=lambda e: e.last_used))
            elif not self._evict_one(exclude=None):
                raise ModelUnavailable(
                    f"model {name!r} cannot be taken on now: the {len(self._entries)} models the "
                    f"pool holds at most are all in use or loading; retry shortly"
                )

    def _outcome(self, entry: PoolEntry[T], get: Callable[[], T]) -> T:
        try:
            return get()
        except ModelMissing as exc:
            self._forget(entry)
            raise ModelNotFound(f"no model named {entry.name!r}: {exc}") from None

    def _give_back(self, entry: PoolEntry[T]) -> None:
        with self._cond:
            entry.in_use -= 1
            entry.last_used = time.time()
            self._cond.notify_all()

    def _forget(self, entry: PoolEntry[T]) -> None:
        # A missing object: nothing is kept for a name that has no model (a flood of made-up
        # names leaves no entries behind); the next request for it asks S3 again.
        with self._cond:
            if self._entries.get(entry.name) is entry and _failed(entry):
                self._drop(entry)

    def _drop(self, entry: PoolEntry[T]) -> None:
        # Only idle entries are dropped: no request holds the model. The holder lets go of it
        # too, so whatever still refers to the entry (a refresh round's list of targets) does
        # not keep the weights alive, nor try to renew a model that is gone.
        del self._entries[entry.name]
        entry.holder.unload()
        self._book(entry, size=0, pending=0)
        self._cond.notify_all()

    def _run(self, entry: PoolEntry[T]) -> T:
        """The load of one entry, in its holder's thread."""

        def reserve(size: int) -> None:
            self._reserve(entry, size)

        try:
            loaded = self._load(entry.name, reserve)
        except BaseException:
            self._unreserve(entry)
            raise
        entry.loaded_once = True
        return loaded

    def _reserve(self, entry: PoolEntry[T], size: int) -> None:
        budget = self.budget
        with self._cond:
            if self._entries.get(entry.name) is not entry:
                raise ModelUnavailable(f"model {entry.name!r} was dropped from the pool; retry")
            self._book(entry, size=0)  # a retried load reserves afresh
            if budget is not None and size > budget:
                raise ModelTooLarge(
                    f"model {entry.name!r} is {size} bytes, more than the whole memory budget "
                    f"of {budget} bytes (LAZYSERVE_MEMORY_BUDGET, or what the function's memory "
                    "leaves after the imports); raise MemorySize or the budget"
                )
            deadline = time.monotonic() + self.wait
            while budget is not None and self.reserved + size > budget:
                if self._evict_one(exclude=entry):
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    in_use = sorted(
                        e.name for e in self._entries.values() if e.in_use and e is not entry
                    )
                    raise ModelTooLarge(
                        f"model {entry.name!r} ({size} bytes) does not fit in the memory budget "
                        f"of {budget} bytes while models in use hold {self.reserved} bytes "
                        f"({', '.join(in_use[:5]) or 'loads under way'}"
                        f"{f' and {len(in_use) - 5} more' if len(in_use) > 5 else ''}); "
                        "retry shortly",
                        retryable=True,  # the models in use are let go of: a retry may fit
                    )
            self._book(entry, size=size)

    def _idle(self, *, exclude: PoolEntry[T] | None) -> list[PoolEntry[T]]:
        """Loaded models nobody uses or refreshes: what may be evicted. Lock held."""
        return [
            e
            for e in self._entries.values()
            if e is not exclude
            and e.in_use == 0
            and not e.refreshing
            and e.holder.status == "loaded"
        ]

    def _evict_one(self, *, exclude: PoolEntry[T] | None) -> bool:
        """Free the least recently used idle resident model; False when none is idle."""
        idle = self._idle(exclude=exclude)
        if not idle:
            return False
        victim = min(idle, key=lambda e: e.last_used)
        size = victim.size
        self._drop(victim)
        self.evictions += 1
        log.info(
            "evicted model %r (%d bytes) to make room",
            victim.name,
            size,
            extra={"model": victim.name, "bytes": size},
        )
        return True

    def _unreserve(self, entry: PoolEntry[T]) -> None:
        with self._cond:
            self._book(entry, size=0)
            self._cond.notify_all()


def _failed(entry: PoolEntry[Any]) -> bool:
    return entry.holder.status == "failed"
