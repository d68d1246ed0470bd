"""New weights without a redeploy (LAZYSERVE_REFRESH_SECONDS): at most every N seconds, in a
thread of its own and never on a request's path, ask S3 whether the object behind each model
changed; load a changed one beside the current one, let the load verify it, then swap it in. A
refresh that fails, or whose two copies would not fit, keeps the current version; a model whose
load failed for good is loaded again by the next request once its object changes."""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lazyserve.errors import LazyserveError, ModelTooLarge, ModelUnavailable
from lazyserve.lazy import LazyModel
from lazyserve.model import Loaded
from lazyserve.sources import ObjectStat

__all__ = ["Refresher", "Target", "beside"]

log = logging.getLogger("lazyserve")

Version = tuple[str | None, str | None]  # (etag, version id)


@dataclass(frozen=True)
class Target:
    """One model a refresh may renew."""

    name: str  # for logs and counts: the URI, or the model's name under a prefix
    holder: LazyModel[Loaded[Any]]
    stat: Callable[[], ObjectStat]  # what the object is now (a HEAD request)
    # Load the object as it is now, verified; it calls `reserve(size)` with the size it reads
    # once it knows it, before it reads (see load_model).
    reload: Callable[[Callable[[int], None]], Loaded[Any]]
    # (current bytes, new bytes): hold room for the new copy beside the current one, or raise
    # ModelTooLarge. Called with the HEAD's size before the reload, then with the size the
    # reload reads: each call replaces the one before. `swapped` or `abandoned` ends it.
    reserve: Callable[[int, int], None]
    swapped: Callable[[Loaded[Any], Loaded[Any]], None] = lambda old, new: None
    abandoned: Callable[[], None] = lambda: None


def beside(budget: int | None) -> Callable[[int, int], None]:
    """`Target.reserve` for a single model: both copies must fit in `budget` bytes."""

    def reserve(current: int, new: int) -> None:
        if budget is not None and current + new > budget:
            raise ModelTooLarge(
                f"{current} + {new} bytes (current and new version) exceed the memory budget of "
                f"{budget} bytes"
            )

    return reserve


class Refresher:
    """Checks its targets every `every` seconds from a daemon thread; counts what it did."""

    def __init__(self, every: float, targets: Callable[[], Iterable[Target]]) -> None:
        self.every = every
        # Held weakly when it is a method: the thread must not keep its service alive (and
        # checking S3) after the service is gone.
        self._targets: Callable[[], Callable[[], Iterable[Target]] | None] = (
            weakref.WeakMethod(targets) if inspect.ismethod(targets) else lambda: targets
        )
        self.checks = 0
        self.refreshes = 0
        self.failures = 0
        self.refused = 0
        # By target name: a version whose refresh failed with an error no retry changes (not
        # downloaded again), and the version seen behind a remembered failed load.
        self._bad: dict[str, Version] = {}
        self._failed: dict[str, tuple[ModelUnavailable, Version]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lazyserve-refresh", daemon=True)

    def start(self) -> Refresher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def counts(self) -> dict[str, int]:
        return {
            "checks": self.checks,
            "refreshes": self.refreshes,
            "failures": self.failures,
            "refused": self.refused,
        }

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            targets = self._targets()
            if targets is None:
                return
            self.check_all(targets())
            del targets

    def check_all(self, targets: Iterable[Target]) -> None:
        """One round: check every target; forget what was remembered about models gone."""
        names: set[str] = set()
        for target in targets:
            names.add(target.name)
            try:
                self.check(target)
            except Exception:  # a bug in one target's hooks must not end every refresh
                log.exception("refresh of %s failed unexpectedly", target.name)
        for memory in (self._bad, self._failed):
            for name in memory.keys() - names:
                del memory[name]

    def check(self, target: Target) -> bool:
        """Renew `target` if its object changed; True when a new version was swapped in."""
        current = target.holder.peek()
        if current is None:  # not loaded (yet, or any more): a load will read the latest
            if target.holder.failure is not None:
                self._look_at_failure(target)
            return False
        self.checks += 1
        info = current.info
        try:
            now = target.stat()
        except Exception as exc:
            self.failures += 1
            log.warning("refresh of %s: cannot tell whether it changed: %s", target.name, exc)
            return False
        version = (now.etag, now.version_id)
        if version == (info.etag, info.version_id) or self._bad.get(target.name) == version:
            return False
        refused: list[int] = []

        def reserve(size: int) -> None:
            try:
                target.reserve(info.size_bytes, size)
            except ModelTooLarge:
                refused.append(size)
                raise

        swapped = False
        try:
            reserve(now.size)  # before any GET: a refresh that cannot fit downloads nothing
            fresh = target.reload(reserve)
            target.holder.swap(fresh)
            target.swapped(current, fresh)
            swapped = True
        except Exception as exc:
            self._not_renewed(target, info.size_bytes, info.sha256, version, refused, exc)
            return False
        finally:
            if not swapped:
                target.abandoned()
        self._bad.pop(target.name, None)
        self.refreshes += 1
        log.info(
            "refreshed %s: sha256 %s -> %s",
            target.name,
            info.sha256,
            fresh.info.sha256,
            extra={"old_sha256": info.sha256, "new_sha256": fresh.info.sha256},
        )
        return True

    def _not_renewed(
        self,
        target: Target,
        current: int,
        sha256: str,
        version: Version,
        refused: list[int],
        exc: Exception,
    ) -> None:
        if refused:
            self.refused += 1
            log.warning(
                "refresh of %s refused: the new version (%d bytes) cannot be loaded beside the "
                "current one (%d bytes) within the memory budget; it is served as it is",
                target.name,
                refused[-1],
                current,
            )
            return
        self.failures += 1
        final = isinstance(exc, ModelUnavailable) and not exc.retryable
        if final:
            self._bad[target.name] = version
        log.error(
            "refresh of %s failed; the current version (sha256 %s) keeps serving%s: %s",
            target.name,
            sha256,
            " and this version is not tried again" if final else "",
            exc,
            exc_info=not isinstance(exc, LazyserveError),
        )

    def _look_at_failure(self, target: Target) -> None:
        """A model whose load failed for good: once its object changes, the next request loads
        it (the holder's own recheck may notice sooner)."""
        error = target.holder.failure
        if error is None:
            return
        self.checks += 1
        try:
            now = target.stat()
        except Exception as exc:
            # DEBUG: the load's own failure was logged as an error already, and a pool may
            # hold hundreds of failed names, each looked at every round.
            log.debug("refresh of %s: cannot tell whether it changed: %s", target.name, exc)
            return
        version = (now.etag, now.version_id)
        seen = self._failed.get(target.name)
        if seen is None or seen[0] is not error:
            self._failed[target.name] = (error, version)
        elif seen[1] != version and target.holder.forget(error):
            del self._failed[target.name]
            log.info("%s changed since its load failed; the next request loads it", target.name)
