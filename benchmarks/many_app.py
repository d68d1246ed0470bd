"""The function benchmarks.many serves: many synthetic models from one prefix, written the
documented way (`Service(build)`, `@service.predict`). Each model is BENCH_MANY_LAYERS x
Linear(BENCH_MANY_WIDTH, BENCH_MANY_WIDTH) (defaults 1 x 2048: 16 MiB of float32)."""

from __future__ import annotations

import os
from typing import Annotated

import torch
from pydantic import BaseModel, Field
from torch import nn

from lazyserve import Loaded, Service

LAYERS = int(os.environ.get("BENCH_MANY_LAYERS", "1"))
WIDTH = int(os.environ.get("BENCH_MANY_WIDTH", "2048"))


def build() -> nn.Module:
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)))


Row = Annotated[list[float], Field(min_length=WIDTH, max_length=WIDTH)]


class PredictRequest(BaseModel):
    inputs: Annotated[list[Row], Field(min_length=1, max_length=16)]


class PredictResponse(BaseModel):
    labels: list[int]
    sha256: str


service = Service(build)


@service.predict
def predict(model: Loaded[nn.Module], request: PredictRequest) -> PredictResponse:
    out = model.module(torch.tensor(request.inputs, dtype=torch.float32))
    return PredictResponse(labels=out.argmax(dim=1).tolist(), sha256=model.info.sha256)


app = service.app
