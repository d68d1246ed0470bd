"""A text classifier from a save_pretrained directory: `app` for uvicorn, `handler` for Lambda."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field
from transformers import AutoModelForSequenceClassification

from lazyserve import Loaded, Service

service = Service.from_pretrained(AutoModelForSequenceClassification)  # LAZYSERVE_MODEL_URI


class Texts(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=64, description="1 to 64 texts")


class Labels(BaseModel):
    labels: list[str]


@service.predict
def predict(model: Loaded[torch.nn.Module], request: Texts) -> Labels:
    batch = model.tokenizer(request.texts, padding=True, truncation=True, return_tensors="pt")
    best = model.module(**batch).logits.argmax(dim=-1).tolist()
    return Labels(labels=[model.config.id2label[i] for i in best])


app = service.app
handler = service.handler
