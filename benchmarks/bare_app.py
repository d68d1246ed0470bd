"""The floor for the warm and uvicorn benchmarks: the reference function's /predict written with
nothing but FastAPI and Mangum, the same body models, the model loaded at import into a plain
module-level global, the forward run inline in an `async def` endpoint (`app`, `handler`).

Two more ways of running the same forward, for comparison rows: a persistent one-thread executor
(`pooled_app`) and a plain `def` endpoint, which FastAPI runs through `run_in_threadpool`
(`threadpool_app`)."""

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


def new_app() -> FastAPI:
    """An empty app as the floor builds it. API Gateway test events carry no Content-Type: read
    them as JSON, as the reference does."""
    return FastAPI(strict_content_type=False)


def add_health(app: FastAPI) -> None:
    """The liveness route a bare app would have (the slow-model scenario probes it)."""

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}


# The floor: the forward inline, on the event loop.
app = new_app()


@app.post("/predict")
async def predict(request: PredictRequest) -> PredictResponse:
    return infer(request.inputs)


add_health(app)
handler = Mangum(app, lifespan="off")


# A persistent executor: the thread, and torch's OpenMP team for it, live as long as the process.
executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
pooled_app = new_app()


@pooled_app.post("/predict")
async def predict_pooled(request: PredictRequest) -> PredictResponse:
    return await asyncio.get_running_loop().run_in_executor(executor, infer, request.inputs)


add_health(pooled_app)
pooled_handler = Mangum(pooled_app, lifespan="off")


# A `def` endpoint: FastAPI runs it with run_in_threadpool (anyio), whose worker threads end with
# the root task, i.e. under Mangum with every invocation.
threadpool_app = new_app()


@threadpool_app.post("/predict")
def predict_threadpool(request: PredictRequest) -> PredictResponse:
    return infer(request.inputs)


add_health(threadpool_app)
threadpool_handler = Mangum(threadpool_app, lifespan="off")
