"""The ASGI apps benchmarks.uvicorn_load serves, by attribute: `floor` (benchmarks.bare_app) and
`reference` (handler.app), imported on first access so a process holds only the one it serves.

`BENCH_GC=1` counts garbage collections (benchmarks.gcstats) and adds `GET /_bench/gc` to the
app; `BENCH_GC_FREEZE=1` moves every object alive after the import to the collector's permanent
generation (`gc.freeze()`), an experiment: full collections then skip them.
`BENCH_SLOW_FORWARD=sleep|torch|python` makes every DigitsMLP forward take 200 ms first
(`BENCH_SLOW_MS` to change it): `sleep` waits without using a CPU (a GPU or a remote call),
`torch` computes on the CPU with the GIL released (what a real CPU forward does: ATen drops the
GIL inside each operator), `python` spins in Python holding the GIL (a worst case).
"""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ["SLOW_MODES"]

SLOW_MODES = ("sleep", "torch", "python")
APPS = ("floor", "reference")


def slow_down(mode: str, seconds: float) -> None:
    """Patch DigitsMLP.forward so that each call first spends `seconds` as `mode` says; the
    patch is on the class, so models built before it are slowed too."""
    import torch

    from handler.model import DigitsMLP

    if mode not in SLOW_MODES:
        raise ValueError(f"BENCH_SLOW_FORWARD={mode!r}; accepted: {', '.join(SLOW_MODES)}")
    original = DigitsMLP.forward
    matrix = torch.rand(256, 256)

    def forward(self: DigitsMLP, x: torch.Tensor) -> torch.Tensor:
        if mode == "sleep":
            time.sleep(seconds)
        else:
            # CPU time of this thread, not wall time: a busy core must not shorten the work.
            started = time.thread_time()
            while time.thread_time() - started < seconds:
                if mode == "torch":
                    torch.mm(matrix, matrix)
        return original(self, x)

    DigitsMLP.forward = forward  # type: ignore[method-assign]


def add_gc_route(app: Any) -> None:
    """Count collections from now on; `GET /_bench/gc` answers the figures."""
    from benchmarks import gcstats

    stats = gcstats.install()

    async def gc_figures() -> dict[str, Any]:
        return stats.snapshot(tracked=True)

    app.add_api_route("/_bench/gc", gc_figures, methods=["GET"], include_in_schema=False)


def __getattr__(name: str) -> Any:
    if name not in APPS:
        raise AttributeError(f"module 'benchmarks.served' has no app {name!r}; apps: {APPS}")
    mode = os.environ.get("BENCH_SLOW_FORWARD")
    if mode:
        slow_down(mode, float(os.environ.get("BENCH_SLOW_MS", "200")) / 1000)
    if name == "floor":
        from benchmarks.bare_app import app
    else:
        from handler.app import app
    if os.environ.get("BENCH_GC") == "1":
        add_gc_route(app)
    if os.environ.get("BENCH_GC_FREEZE") == "1":
        import gc

        gc.collect()
        gc.freeze()
    globals()[name] = app
    return app
