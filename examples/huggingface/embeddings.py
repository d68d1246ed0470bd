"""Sentence embeddings (mean pooling) from the save_pretrained directory of a transformers
AutoModel."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field
from transformers import AutoModel

from lazyserve import Loaded, Service

service = Service.from_pretrained(AutoModel)  # LAZYSERVE_MODEL_URI names the directory


class Texts(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=64, description="1 to 64 texts")


class Embeddings(BaseModel):
    embeddings: list[list[float]]


@service.predict
def embed(model: Loaded[torch.nn.Module], request: Texts) -> Embeddings:
    batch = model.tokenizer(request.texts, padding=True, truncation=True, return_tensors="pt")
    tokens = model.module(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return Embeddings(embeddings=torch.nn.functional.normalize(mean, dim=-1).tolist())


app = service.app
handler = service.handler
