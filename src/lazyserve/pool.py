"""Many models from one prefix, each loaded on first use (single-flight, as one model is), held
under a memory budget: a load reserves its size before it downloads, idle models are evicted
least recently used first, and a model in use by a request is never freed under it."""

from __future__ import annotations

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
from lazyserve.lazy import LazyModel, Status
from lazyserve.model import Loaded

__all__ = ["ModelPool", "PoolEntry"]

T = TypeVar("T", bound=Loaded[Any])
log = logging.getLogger("lazyserve")

# A load of `name` that reserves bytes through `reserve(size)` before it reads them.
Load = Callable[[str, Callable[[int], None]], T]
Check = Callable[[str], None]  # raises ModelNotFound for a name that cannot exist


@dataclass
class PoolEntry(Generic[T]):
    """One model of the pool: its holder and what the budget and `GET /models` need."""

    name: str
    holder: LazyModel[T]
    size: int = 0  # bytes reserved for its weights; 0 until the load knows them
    in_use: int = 0  # requests holding it now
    hits: int = 0
    last_used: float = field(default_factory=time.time)
    loaded_once: bool = False

    def describe(self) -> dict[str, Any]:
        loaded = self.holder.peek()
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
        }


class ModelPool(Generic[T]):
    """Models by name; `lease(name)` / `alease(name)` give one loaded model for the duration of
    a request."""

    def __init__(
        self,
        load: Load[T],
        *,
        check: Check,
        budget: int | None,
        wait: float = 25.0,
    ) -> None:
        self._load = load
        self._check = check
        self.budget = budget
        self.wait = wait
        self._entries: dict[str, PoolEntry[T]] = {}
        self.reserved = 0  # bytes of the weights resident or being read
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
        """`loaded` once any model is resident, else `not_loaded` (for `GET /health`)."""
        with self._cond:
            entries = list(self._entries.values())
        return "loaded" if any(e.holder.status == "loaded" for e in entries) else "not_loaded"

    def describe(self) -> dict[str, Any]:
        """What `GET /models` shows: the budget and every model the pool holds."""
        with self._cond:
            entries = [e.describe() for e in self._entries.values()]
            return {
                "budget_bytes": self.budget,
                "resident_bytes": self.reserved,
                "peak_resident_bytes": self.peak_reserved,
                "evictions": self.evictions,
                "models": sorted(entries, key=lambda e: e["name"]),
            }

    def entries(self) -> list[PoolEntry[T]]:
        with self._cond:
            return list(self._entries.values())

    def reserve_extra(self, size: int) -> bool:
        """Reserve `size` more bytes if they fit now, evicting nothing (a refresh's new copy)."""
        with self._cond:
            if self.budget is not None and self.reserved + size > self.budget:
                return False
            self.reserved += size
            self.peak_reserved = max(self.peak_reserved, self.reserved)
            return True

    def release_extra(self, size: int) -> None:
        with self._cond:
            self.reserved -= size
            self._cond.notify_all()

    def swapped(self, entry: PoolEntry[T], size: int) -> None:
        """`entry` now serves a new version of `size` bytes, reserved with reserve_extra; the
        old version's bytes go back to the budget (requests still holding it finish first, but
        they hold it outside any new reservation for at most one request's time)."""
        with self._cond:
            self.reserved -= entry.size
            if self._entries.get(entry.name) is entry:
                entry.size = size
            else:  # evicted meanwhile: nothing holds the new version either
                self.reserved -= size
            self._cond.notify_all()

    # -- bookkeeping -----------------------------------------------------------------------------

    def _take(self, name: str) -> PoolEntry[T]:
        self._check(name)  # a name that cannot exist is a 404 without an S3 call
        with self._cond:
            entry = self._entries.get(name)
            if entry is None:
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

        entry = PoolEntry(name, LazyModel(load, wait=self.wait, name=f"model {name!r}"))
        entry_ref = weakref.ref(entry)
        return entry

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
        with self._cond:
            if self._entries.get(entry.name) is entry and entry.holder.status != "loaded":
                del self._entries[entry.name]

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
            self._release(entry)  # a retried load reserves afresh
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
                    in_use = sorted(e.name for e in self._entries.values() if e.in_use)
                    raise ModelTooLarge(
                        f"model {entry.name!r} ({size} bytes) does not fit in the memory budget "
                        f"of {budget} bytes while models in use hold {self.reserved} bytes "
                        f"({', '.join(in_use) or 'loads under way'}); retry shortly"
                    )
            entry.size = size
            self.reserved += size
            self.peak_reserved = max(self.peak_reserved, self.reserved)

    def _evict_one(self, *, exclude: PoolEntry[T]) -> bool:
        """Free the least recently used idle resident model; False when none is idle."""
        idle = [
            e
            for e in self._entries.values()
            if e is not exclude and e.in_use == 0 and e.size and e.holder.status == "loaded"
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda e: e.last_used)
        del self._entries[victim.name]
        self._release(victim)
        self.evictions += 1
        log.info(
            "evicted model %r (%d bytes) to make room",
            victim.name,
            victim.size,
            extra={"model": victim.name, "bytes": victim.size},
        )
        return True

    def _release(self, entry: PoolEntry[T]) -> None:
        self.reserved -= entry.size
        entry.size = 0

    def _unreserve(self, entry: PoolEntry[T]) -> None:
        with self._cond:
            self._release(entry)
            self._cond.notify_all()
