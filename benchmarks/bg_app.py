"""A stand-in for handler/app.py for benchmarks.background: the same order (settings, then the
prefetch unless loading is lazy, then `import torch` and the web stack, then the model), with a
model that fits the benchmark's synthetic weights. Prints its timings as one JSON line."""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # CLOCK_MONOTONIC: comparable with the parent's clock

import json  # noqa: E402
import os  # noqa: E402

from lazyserve.settings import load_settings  # noqa: E402
from lazyserve.sources import prefetch  # noqa: E402

settings = load_settings()
if settings.load != "lazy":
    prefetch(settings)
IMPORT_STARTED = time.perf_counter()

import torch  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from mangum import Mangum  # noqa: E402
from torch import nn  # noqa: E402

from lazyserve import lambda_handler, setup_app  # noqa: E402
from lazyserve.model import load_model  # noqa: E402

IMPORTED = time.perf_counter()
LAYERS = int(os.environ["BENCH_LAYERS"])
WIDTH = 4096


def build() -> nn.Sequential:
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)))


loaded = load_model(build, settings)
READY = time.perf_counter()
first = next(loaded.module.parameters())
assert not first.is_meta and first.dtype == torch.float32
del FastAPI, Mangum, lambda_handler, setup_app  # imported only as the reference imports them

info = loaded.info
fetch_started = READY - info.total_seconds
print(
    json.dumps(
        {
            "mode": settings.load,
            "started": STARTED,
            "import_started": IMPORT_STARTED,
            "imported": IMPORTED,
            "fetch_started": fetch_started,
            "fetch_ended": fetch_started + info.fetch_seconds,
            "ready": READY,
            "fetch_seconds": info.fetch_seconds,
            "build_seconds": info.build_seconds,
            "size": info.size_bytes,
        }
    )
)
