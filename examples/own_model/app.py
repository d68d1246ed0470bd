"""Serve MyNet: `app` for uvicorn, `handler` for AWS Lambda."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import BaseModel, Field

from examples.own_model.net import MyNet
from lazyserve import Loaded, Service

service = Service(MyNet)  # reads LAZYSERVE_MODEL_URI=s3://my-bucket/mynet.safetensors, ...

Row = Annotated[list[float], Field(min_length=4, max_length=4)]


class PredictRequest(BaseModel):
    inputs: list[Row] = Field(min_length=1, max_length=256, description="1 to 256 rows of 4")


class PredictResponse(BaseModel):
    labels: list[int]


@service.predict
def predict(model: Loaded[MyNet], request: PredictRequest) -> PredictResponse:
    scores = model.module(torch.tensor(request.inputs))
    return PredictResponse(labels=scores.argmax(dim=1).tolist())


app = service.app  # uvicorn examples.own_model.app:app
handler = service.handler  # on Lambda: CMD ["examples.own_model.app.handler"]
