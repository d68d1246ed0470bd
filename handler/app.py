"""The reference function: a digits classifier (8x8 images, 64 inputs in 0..16, 10 classes)."""

from __future__ import annotations

from lazyserve.settings import load_settings
from lazyserve.sources import prefetch

# Settings first: a bad LAZYSERVE_* value fails the import (on Lambda, an init error) before
# any AWS call. Unless loading is lazy, the weights download starts now, in a thread, and
# overlaps the imports below (torch alone takes a second or more).
settings = load_settings()
if settings.load != "lazy":
    prefetch(settings)

import os  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import torch  # noqa: E402
from fastapi import Depends, FastAPI  # noqa: E402
from pydantic import BaseModel, Field, ValidationError  # noqa: E402

from handler.model import CLASSES, INPUTS, PIXEL_MAX, DigitsMLP  # noqa: E402
from lazyserve import Loaded, lambda_handler, lazy_model, setup_app, start_loading, timing  # noqa: E402
from lazyserve.app import TOO_LARGE, UNAVAILABLE, in_worker  # noqa: E402
from lazyserve.aws import invalid_input  # noqa: E402
from lazyserve.logs import configure_logging  # noqa: E402
from lazyserve.metrics import MetricsMiddleware, ModelMetrics, metrics_enabled  # noqa: E402
from lazyserve.types import LambdaEvent  # noqa: E402

MAX_ROWS = 256
RULES = f"1 to {MAX_ROWS} rows, each exactly {INPUTS} finite numbers in 0..{PIXEL_MAX}"

configure_logging(settings.log_level)  # JSON lines on Lambda, text in a terminal

model = lazy_model(DigitsMLP, settings)

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


# No Content-Type (API Gateway test events, sam local) is read as JSON, as API Gateway does.
app = FastAPI(title="lazyserve digits", version="0.1.0", strict_content_type=False)
setup_app(app, model)


def infer(loaded: Loaded[DigitsMLP], rows: list[list[float]]) -> PredictResponse:
    with timing.timed("infer"), torch.inference_mode():
        probs = torch.softmax(loaded.module(torch.tensor(rows, dtype=torch.float32)), dim=1)
    labels = probs.argmax(dim=1).tolist()
    return PredictResponse(
        predictions=[
            Prediction(label=label, probabilities=p)
            for label, p in zip(labels, probs.tolist(), strict=True)
        ],
        model=ModelRef(sha256=loaded.info.sha256),
    )


async def digits_model(request: PredictRequest) -> Loaded[DigitsMLP]:
    """The loaded model, as a dependency that takes the request body: FastAPI runs
    dependencies before it validates the body, except those whose own parameters fail, so a
    bad body is a 422 at once, even while the model loads or cannot load."""
    return await model.aget()


@app.post("/predict", responses={**UNAVAILABLE, **TOO_LARGE})
async def predict(
    request: PredictRequest, loaded: Annotated[Loaded[DigitsMLP], Depends(digits_model)]
) -> PredictResponse:
    # Inference in a worker thread keeps the event loop free for /health under load.
    return await in_worker(infer, loaded, request.inputs)


def predict_direct(event: LambdaEvent) -> dict[str, Any]:
    """A direct invocation `{"inputs": [...]}`: the same JSON as `POST /predict`."""
    try:
        request = PredictRequest.model_validate(event)
    except ValidationError as exc:
        raise invalid_input(exc, RULES) from None
    return infer(model.get(), request.inputs).model_dump()


# EMF metrics: on Lambda once per invocation; elsewhere per request if LAZYSERVE_METRICS=on.
metrics = ModelMetrics(model) if metrics_enabled(settings.metrics) else None
if metrics is not None and "AWS_LAMBDA_FUNCTION_NAME" not in os.environ:
    app.add_middleware(MetricsMiddleware, metrics=metrics)
handler = lambda_handler(app, model, direct=predict_direct, metrics=metrics)
start_loading(model, settings)
