"""New weights without a redeploy (LAZYSERVE_REFRESH_SECONDS): at most every N seconds, in a
thread of its own and never on a request's path, ask S3 whether the object behind each loaded
model changed; load a changed one beside the current one, let the load verify it, then swap it
in. A refresh that fails, or whose two copies would not fit, keeps the current version."""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lazyserve.lazy import LazyModel
from lazyserve.model import Loaded
from lazyserve.sources import ObjectStat

__all__ = ["Refresher", "Target"]

log = logging.getLogger("lazyserve")


@dataclass(frozen=True)
class Target:
    """One loaded model a refresh may renew."""

    name: str  # for logs and counts: the URI, or the model's name under a prefix
    holder: LazyModel[Loaded[Any]]
    stat: Callable[[], ObjectStat]  # what the object is now (a HEAD request)
    reload: Callable[[], Loaded[Any]]  # load the object as it is now, verified
    # (current bytes, new bytes) -> True when the new copy may be loaded beside the current
    # one; the memory it takes is then reserved until `swapped` or `abandoned` says what became
    # of it.
    reserve: Callable[[int, int], bool]
    swapped: Callable[[Loaded[Any], Loaded[Any]], None] = lambda old, new: None
    abandoned: Callable[[int], None] = lambda size: None


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
            for target in list(targets()):
                self.check(target)
            del targets

    def check(self, target: Target) -> bool:
        """Renew `target` if its object changed; True when a new version was swapped in."""
        current = target.holder.peek()
        if current is None:  # not loaded (yet, or any more): a load will read the latest
            return False
        self.checks += 1
        info = current.info
        try:
            now = target.stat()
        except Exception as exc:
            self.failures += 1
            log.warning("refresh of %s: cannot tell whether it changed: %s", target.name, exc)
            return False
        if now.etag == info.etag and now.version_id == info.version_id:
            return False
        if not target.reserve(info.size_bytes, now.size):
            self.refused += 1
            log.warning(
                "refresh of %s refused: the new version (%d bytes) cannot be loaded beside the "
                "current one (%d bytes) within the memory budget; it is served as it is",
                target.name,
                now.size,
                info.size_bytes,
            )
            return False
        try:
            fresh = target.reload()
        except Exception as exc:
            target.abandoned(now.size)
            self.failures += 1
            log.error(
                "refresh of %s failed; the current version (sha256 %s) keeps serving: %s",
                target.name,
                info.sha256,
                exc,
            )
            return False
        target.holder.swap(fresh)
        target.swapped(current, fresh)
        self.refreshes += 1
        log.info(
            "refreshed %s: sha256 %s -> %s",
            target.name,
            info.sha256,
            fresh.info.sha256,
            extra={"old_sha256": info.sha256, "new_sha256": fresh.info.sha256},
        )
        return True
