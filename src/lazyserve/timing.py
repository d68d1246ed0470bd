"""Per-request timings (load wait, inference) for `Server-Timing`, metrics and `GET /model`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field

__all__ = ["Timings", "begin", "current", "end", "note", "record", "stats", "timed"]


@dataclass
class Timings:
    """What one request or invocation spent, in milliseconds, by name."""

    started: float = field(default_factory=time.perf_counter)
    entries: list[tuple[str, float]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (name, description), no duration
    model: str | None = None  # with many models: the one the request named

    def total(self, name: str) -> float | None:
        values = [ms for entry, ms in self.entries if entry == name]
        return sum(values) if values else None

    def header(self) -> str:
        parts = [f"{name};dur={ms:.3f}" for name, ms in self.entries]
        parts += [f'{name};desc="{text}"' for name, text in self.notes]
        parts.append(f"app;dur={(time.perf_counter() - self.started) * 1000:.3f}")
        return ", ".join(parts)


# A mutable object in a ContextVar: threads started by run_in_threadpool get a copy of the
# context, and so the same Timings, and what they record reaches the request's header.
_current: ContextVar[Timings | None] = ContextVar("lazyserve_timings", default=None)
_lock = threading.Lock()
_stats: dict[str, list[float]] = {}  # name -> [count, total ms, last ms]


def begin() -> Token[Timings | None]:
    return _current.set(Timings())


def end(token: Token[Timings | None]) -> None:
    _current.reset(token)


def current() -> Timings | None:
    return _current.get()


def record(name: str, seconds: float) -> None:
    """Add a duration to the current request's timings and to the process-wide figures."""
    ms = seconds * 1000
    timings = _current.get()
    if timings is not None:
        timings.entries.append((name, ms))
    with _lock:
        count, total, _ = _stats.get(name, (0, 0.0, 0.0))
        _stats[name] = [count + 1, total + ms, ms]


def note(name: str, text: str) -> None:
    """Describe the current request in its Server-Timing header (`batch;desc="size=8"`); `text`
    is lazyserve's own, without quotes or backslashes."""
    timings = _current.get()
    if timings is not None:
        timings.notes.append((name, text))


@contextmanager
def timed(name: str) -> Iterator[None]:
    """`with timed("infer"): ...` records how long the block took."""
    started = time.perf_counter()
    try:
        yield
    finally:
        record(name, time.perf_counter() - started)


def stats() -> dict[str, dict[str, int | float]]:
    """Process-wide figures by name: count, mean and last duration in milliseconds."""
    with _lock:
        return {
            name: {
                "count": int(count),
                "mean_ms": round(total / count, 3),
                "last_ms": round(last, 3),
            }
            for name, (count, total, last) in _stats.items()
        }
