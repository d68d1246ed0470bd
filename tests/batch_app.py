"""A batched function for tests/test_batching.py under a real uvicorn: examples/own_model's MyNet,
one row a request, each answer naming its request's id and the size of the call that made it.

BATCH_APP_HOLD=N: the first call waits (at most 30 s) until N requests are queued behind it, so
the test knows which requests the next call gathers."""

from __future__ import annotations

import os
import time

import torch
from examples.own_model.net import MyNet
from pydantic import BaseModel, Field

from lazyserve import Loaded, Service

HOLD = int(os.environ.get("BATCH_APP_HOLD", "0"))
HOLD_LIMIT = 30.0

service = Service(MyNet)
_calls = 0


class Row(BaseModel):
    id: int
    inputs: list[float] = Field(min_length=4, max_length=4)


class Label(BaseModel):
    id: int
    label: int
    size: int


@service.predict_batch(max_size=32, max_wait_ms=2)
def predict(model: Loaded[MyNet], requests: list[Row]) -> list[Label]:
    global _calls
    _calls += 1
    if _calls == 1 and HOLD:
        batcher = service._batcher
        assert batcher is not None
        deadline = time.monotonic() + HOLD_LIMIT
        while batcher.waiting() < HOLD and time.monotonic() < deadline:
            time.sleep(0.005)
    labels = model.module(torch.tensor([r.inputs for r in requests])).argmax(dim=1).tolist()
    return [
        Label(id=r.id, label=label, size=len(requests))
        for r, label in zip(requests, labels, strict=True)
    ]


app = service.app
