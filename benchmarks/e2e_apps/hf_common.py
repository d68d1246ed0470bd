"""What the transformers benchmark functions share: a BERT model's forward on token ids, the body
models, and the plain FastAPI app. BENCH_E2E_HF_DIR names the save_pretrained directory."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from fastapi import FastAPI
from pydantic import BaseModel, Field

from benchmarks.e2e_apps.common import Prediction, PredictResponse

TOKENS = 16  # the event's sequence length
Ids = Annotated[list[Annotated[int, Field(ge=0, lt=30522)]], Field(min_length=1, max_length=512)]


class TokensRequest(BaseModel):
    input_ids: Annotated[list[Ids], Field(min_length=1, max_length=64)]


def infer(module: Any, ids: list[list[int]]) -> PredictResponse:
    """The pooled output's softmax: its top dimension and probability per row."""
    with torch.inference_mode():
        pooled = module(input_ids=torch.tensor(ids, dtype=torch.long)).pooler_output
        probs = torch.softmax(pooled.float(), dim=1)
    top = probs.max(dim=1)
    return PredictResponse(
        predictions=[
            Prediction(label=label, probability=p)
            for label, p in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]
    )


def plain_app(module: Any) -> FastAPI:
    """`POST /predict` as a FastAPI user writes it: a sync endpoint, the model in a global."""
    app = FastAPI(strict_content_type=False)  # API Gateway test events carry no Content-Type

    @app.post("/predict")
    def predict(request: TokensRequest) -> PredictResponse:
        return infer(module, request.input_ids)

    return app
