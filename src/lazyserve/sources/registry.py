"""The registry of fetches started ahead of the load that takes them (e.g. before `import
torch`), keyed by model URI; each is taken once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

from lazyserve.sources.weights import Weights

__all__ = ["reset", "start", "take"]

_prefetches: dict[str, Future[Weights]] = {}
_lock = threading.Lock()


def start(uri: str, fetch: Callable[[], Weights]) -> Future[Weights]:
    """Run `fetch` in a thread of its own unless a fetch of `uri` is already waiting."""
    with _lock:
        future = _prefetches.get(uri)
        if future is not None:
            return future
        future = Future()
        future.set_running_or_notify_cancel()
        _prefetches[uri] = future

    def run() -> None:
        try:
            future.set_result(fetch())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="lazyserve-prefetch", daemon=True).start()
    return future


def take(uri: str) -> Future[Weights] | None:
    with _lock:
        return _prefetches.pop(uri, None)


def reset() -> None:
    """Forget every prefetch no load has taken."""
    with _lock:
        _prefetches.clear()
