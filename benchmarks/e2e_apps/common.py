"""What every benchmark function shares: the model, the body models, the forward and the plain
FastAPI app. BENCH_E2E_LAYERS=0 is the reference digits MLP; N > 0 is N x Linear(4096, 4096)."""

from __future__ import annotations

import os
from typing import Annotated

import torch
from fastapi import FastAPI
from pydantic import BaseModel, Field
from safetensors.torch import load_file
from torch import nn

from handler.model import INPUTS as DIGITS_INPUTS
from handler.model import PIXEL_MAX, DigitsMLP

LAYERS = int(os.environ.get("BENCH_E2E_LAYERS", "0"))
WIDTH = 4096
INPUTS = DIGITS_INPUTS if LAYERS == 0 else WIDTH


def build(layers: int = LAYERS) -> nn.Module:
    if layers == 0:
        return DigitsMLP()
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)))


Value = Annotated[float, Field(ge=0, le=PIXEL_MAX, allow_inf_nan=False, strict=True)]
Row = Annotated[list[Value], Field(min_length=INPUTS, max_length=INPUTS)]


class PredictRequest(BaseModel):
    inputs: Annotated[list[Row], Field(min_length=1, max_length=256)]


class Prediction(BaseModel):
    label: int
    probability: float


class PredictResponse(BaseModel):
    predictions: list[Prediction]


def infer(module: nn.Module, rows: list[list[float]]) -> PredictResponse:
    with torch.inference_mode():
        probs = torch.softmax(module(torch.tensor(rows, dtype=torch.float32)), dim=1)
    top = probs.max(dim=1)
    return PredictResponse(
        predictions=[
            Prediction(label=label, probability=p)
            for label, p in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]
    )


def load_local(path: str, layers: int = LAYERS) -> nn.Module:
    """The weights from a local safetensors file, adopted by a module built on the meta device
    (no random initialisation, no second copy)."""
    state = load_file(path)
    with torch.device("meta"):
        module = build(layers)
    module.load_state_dict(state, assign=True)
    return module.eval()


def plain_app(module: nn.Module) -> FastAPI:
    """`POST /predict` the way a FastAPI user writes it: a sync endpoint, which FastAPI runs in
    its thread pool, with the model in a global."""
    app = FastAPI(strict_content_type=False)  # API Gateway test events carry no Content-Type

    @app.post("/predict")
    def predict(request: PredictRequest) -> PredictResponse:
        return infer(module, request.inputs)

    return app
