"""The floor for benchmarks.warm: the reference function's /predict written with nothing but
FastAPI and Mangum, the model loaded at import into a plain module-level global."""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI
from mangum import Mangum
from pydantic import BaseModel, Field
from safetensors.torch import load_file
from starlette.concurrency import run_in_threadpool

from handler.model import CLASSES, INPUTS, PIXEL_MAX, DigitsMLP

WEIGHTS = Path(__file__).resolve().parent.parent / "handler" / "weights" / "digits.safetensors"
MAX_ROWS = 256

# The same body models as handler/app.py.
Pixel = Annotated[float, Field(ge=0, le=PIXEL_MAX, allow_inf_nan=False, strict=True)]
Row = Annotated[list[Pixel], Field(min_length=INPUTS, max_length=INPUTS)]


class PredictRequest(BaseModel):
    inputs: Annotated[list[Row], Field(min_length=1, max_length=MAX_ROWS)]


class Prediction(BaseModel):
    label: int
    probabilities: list[float] = Field(min_length=CLASSES, max_length=CLASSES)


class ModelRef(BaseModel):
    sha256: str


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model: ModelRef


model = DigitsMLP()
model.load_state_dict(load_file(str(WEIGHTS)))
model.eval()
model_ref = ModelRef(sha256=hashlib.sha256(WEIGHTS.read_bytes()).hexdigest())


def infer(rows: list[list[float]]) -> PredictResponse:
    with torch.inference_mode():
        probs = torch.softmax(model(torch.tensor(rows, dtype=torch.float32)), dim=1)
    labels = probs.argmax(dim=1).tolist()
    return PredictResponse(
        predictions=[
            Prediction(label=label, probabilities=p)
            for label, p in zip(labels, probs.tolist(), strict=True)
        ],
        model=model_ref,
    )


# API Gateway test events carry no Content-Type; read them as JSON, as the reference does.
app = FastAPI(strict_content_type=False)


@app.post("/predict")
async def predict(request: PredictRequest) -> PredictResponse:
    return await run_in_threadpool(infer, request.inputs)


handler = Mangum(app, lifespan="off")


# The same app with inference in a persistent executor: under Mangum, anyio's worker threads
# end with each invocation, so run_in_threadpool starts a new thread (and torch a new OpenMP
# team) on every call; these threads live as long as the process.
executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
pooled_app = FastAPI(strict_content_type=False)


@pooled_app.post("/predict")
async def predict_pooled(request: PredictRequest) -> PredictResponse:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, infer, request.inputs)


pooled_handler = Mangum(pooled_app, lifespan="off")
