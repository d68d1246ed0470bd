"""The memory one read of a weights file may still allocate, and the refusal of a file whose
reading would need more than that, decided from its sizes before anything is allocated."""

from __future__ import annotations

from lazyserve import environment
from lazyserve.errors import ModelTooLarge

__all__ = ["Headroom", "available_memory"]

_MIB = 1024 * 1024


def available_memory() -> int | None:
    """Bytes this process may still allocate: memory_limit() less resident_bytes() (what it
    already holds, the fetched weights included); None when the process has no limit."""
    limit = environment.memory_limit()
    return None if limit is None else max(0, limit - environment.resident_bytes())


class Headroom:
    """What one read may allocate (`limit` bytes, None: no limit); `need()` refuses a step
    whose estimate, everything the read holds by then included, is more."""

    def __init__(self, uri: str, limit: int | None, *, source: str | None = None) -> None:
        self.uri = uri
        self.limit = limit
        # Where the limit comes from, for the message: the caller's number, or the process's.
        self.source = source

    def need(self, estimate: int, what: str) -> None:
        """Raise ModelTooLarge when `estimate` bytes (for `what`, e.g. "its header of 90,000,000
        bytes") do not fit in the limit."""
        if self.limit is None or estimate <= self.limit:
            return
        source = self.source or f"{environment.memory_limit_source()} less what the process holds"
        raise ModelTooLarge(
            f"{self.uri}: reading {what} would take about {_mib(estimate)}, more than the "
            f"{_mib(self.limit)} this load may still use ({source}): check the file, or give "
            "the function more memory"
        )


def _mib(size: int) -> str:
    return f"{-(-size // _MIB):,} MiB"
