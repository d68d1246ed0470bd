"""The reference function: a digits classifier (8x8 images, 64 inputs in 0..16, 10 classes).

`app` is the FastAPI app (uvicorn), `handler` the AWS Lambda entry point."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import BaseModel, Field

from handler.model import CLASSES, INPUTS, PIXEL_MAX, DigitsMLP
from lazyserve import Loaded, Service

MAX_ROWS = 256
RULES = f"1 to {MAX_ROWS} rows, each exactly {INPUTS} finite numbers in 0..{PIXEL_MAX}"

service = Service(DigitsMLP)

Pixel = Annotated[float, Field(ge=0, le=PIXEL_MAX, allow_inf_nan=False, strict=True)]
Row = Annotated[list[Pixel], Field(min_length=INPUTS, max_length=INPUTS)]


class PredictRequest(BaseModel):
    inputs: Annotated[list[Row], Field(min_length=1, max_length=MAX_ROWS, description=RULES)]


class Prediction(BaseModel):
    label: int
    probabilities: list[float] = Field(min_length=CLASSES, max_length=CLASSES)


class ModelRef(BaseModel):
    sha256: str


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model: ModelRef


@service.predict
def predict(model: Loaded[DigitsMLP], request: PredictRequest) -> PredictResponse:
    """Classify each row: the most likely digit and the probability of every digit."""
    probs = torch.softmax(model.module(torch.tensor(request.inputs, dtype=torch.float32)), dim=1)
    labels = probs.argmax(dim=1).tolist()
    return PredictResponse(
        predictions=[
            Prediction(label=label, probabilities=p)
            for label, p in zip(labels, probs.tolist(), strict=True)
        ],
        model=ModelRef(sha256=model.info.sha256),
    )


app = service.app
handler = service.handler
