"""What a benchmarked process spent besides the work itself: the garbage collector's full
(generation 2) collections and their pauses, through `gc.callbacks`, and the time its threads
ran and waited for a CPU (`/proc/PID/task/*/schedstat`)."""

from __future__ import annotations

import gc
import glob
import time
from typing import Any

__all__ = ["GCStats", "delta", "install", "schedstat"]


class GCStats:
    """Collections per generation, and total and longest pause of each, since installation."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_ns = [0, 0, 0]
        self.max_pause_ns = [0, 0, 0]
        self._started = 0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        # The collector is not re-entrant and calls both phases from one thread with the GIL
        # held, so one start time is enough.
        if phase == "start":
            self._started = time.perf_counter_ns()
            return
        pause = time.perf_counter_ns() - self._started
        generation = int(info["generation"])
        self.collections[generation] += 1
        self.pause_ns[generation] += pause
        self.max_pause_ns[generation] = max(self.max_pause_ns[generation], pause)

    @property
    def full(self) -> int:
        return self.collections[2]

    def snapshot(self, *, tracked: bool = False) -> dict[str, Any]:
        """Figures so far; `tracked` adds how many objects the collector tracks (walks them all:
        a few milliseconds, so not on a measured path)."""
        out: dict[str, Any] = {
            "collections": list(self.collections),
            "pause_ms": [round(ns / 1e6, 3) for ns in self.pause_ns],
            "max_pause_ms": [round(ns / 1e6, 3) for ns in self.max_pause_ns],
            "thresholds": list(gc.get_threshold()),
        }
        if tracked:
            out["tracked"] = len(gc.get_objects())
        return out


def install() -> GCStats:
    """Start counting in this process."""
    stats = GCStats()
    gc.callbacks.append(stats.callback)
    return stats


def delta(before: dict[str, Any], after: dict[str, Any], requests: int) -> dict[str, Any]:
    """Full collections and their pauses between two snapshots, also per 1,000 requests."""
    full = after["collections"][2] - before["collections"][2]
    pause = after["pause_ms"][2] - before["pause_ms"][2]
    per = 1000 / requests if requests else 0.0
    return {
        "full": full,
        "full_pause_ms": round(pause, 3),
        "full_per_1k": round(full * per, 2),
        "full_pause_ms_per_1k": round(pause * per, 2),
        "mean_full_pause_ms": round(pause / full, 2) if full else 0.0,
        "max_full_pause_ms": after["max_pause_ms"][2],  # since installation
        "tracked": after.get("tracked"),
    }


def schedstat(pid: int | str = "self") -> tuple[float, float]:
    """Milliseconds all threads of `pid` have run, and waited on a run queue for a CPU (Linux
    schedstat; zeros elsewhere). A wait that is a large part of the run time means other
    processes held the CPU: the figures of that run measure the machine, not the code."""
    ran = waited = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                fields = f.read().split()
        except OSError:  # the thread ended meanwhile
            continue
        ran += int(fields[0])
        waited += int(fields[1])
    return ran / 1e6, waited / 1e6
