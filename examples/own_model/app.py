from __future__ import annotations

from typing import Annotated

import torch
from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field

from examples.own_model.net import MyNet
from lazyserve import Loaded, lambda_handler, lazy_model, load_settings, setup_app
from lazyserve.app import in_worker
from lazyserve.logs import configure_logging
from lazyserve.timing import timed

settings = load_settings()  # LAZYSERVE_MODEL_URI=s3://my-bucket/mynet.safetensors, ...
configure_logging(settings.log_level)  # JSON lines on Lambda, readable text in a terminal
model = lazy_model(MyNet, settings)  # nothing loads yet

# strict_content_type=False: API Gateway test events and `sam local` send JSON bodies without
# a Content-Type header.
app = FastAPI(strict_content_type=False)
setup_app(app, model)  # /health, /ready, /model, the 503 handler, the 6 MiB limit, Server-Timing


class PredictRequest(BaseModel):
    inputs: list[Annotated[list[float], Field(min_length=4, max_length=4)]] = Field(
        min_length=1, max_length=256
    )


class PredictResponse(BaseModel):
    labels: list[int]


async def loaded_model(request: PredictRequest) -> Loaded[MyNet]:
    # This dependency takes the body, so FastAPI validates the body first: a bad request is a
    # 422 at once. With `Depends(model)` it would wait for the load (or get its 503) first.
    return await model.aget()


def infer(loaded: Loaded[MyNet], rows: list[list[float]]) -> PredictResponse:
    with timed("infer"), torch.inference_mode():  # timed: `infer;dur=` in Server-Timing
        scores = loaded.module(torch.tensor(rows))
    return PredictResponse(labels=scores.argmax(dim=1).tolist())


@app.post("/predict")
async def predict(
    request: PredictRequest, loaded: Annotated[Loaded[MyNet], Depends(loaded_model)]
) -> PredictResponse:
    # in_worker: inference runs in a long-lived worker thread, so it never blocks the event
    # loop (and, unlike FastAPI's thread pool under Mangum, no thread is started per call).
    return await in_worker(infer, loaded, request.inputs)


handler = lambda_handler(app, model)  # on Lambda: examples.own_model.app.handler
