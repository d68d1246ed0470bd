"""The function benchmarks.batching serves: a BERT text classifier (transformers'
BertForSequenceClassification, from the BertConfig in BENCH_BERT_CONFIG, a JSON object) behind
`@service.predict` (BENCH_BATCH_MODE=single) or `@service.predict_batch` (batch).

`uvicorn --factory benchmarks.batching_app:create_app`; `build(mode)` for in-process use.
Texts become token ids without a vocabulary file (nothing is downloaded): each word's crc32 picks
an id, between [CLS] and [SEP]; a batch is padded to its longest text, with an attention mask.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import BaseModel, Field
from transformers import BertConfig, BertForSequenceClassification

from lazyserve import Loaded, Service
from lazyserve.settings import Settings

__all__ = ["MODES", "Label", "Text", "build", "config", "create_app"]

MODES = ("single", "batch")
PAD, CLS, SEP, FIRST_WORD = 0, 1, 2, 3
MAX_TOKENS = 64


class Text(BaseModel):
    text: str = Field(min_length=1, max_length=2000, description="a sentence, words apart")


class Label(BaseModel):
    label: int
    score: float


def config(environ: dict[str, str] | None = None) -> BertConfig:
    """The model's BertConfig: BENCH_BERT_CONFIG's fields over BertConfig's defaults."""
    env = os.environ if environ is None else environ
    return BertConfig(**json.loads(env.get("BENCH_BERT_CONFIG", "{}")))


def token_ids(text: str, vocab_size: int) -> list[int]:
    words = text.lower().split()[: MAX_TOKENS - 2]
    ids = [FIRST_WORD + zlib.crc32(w.encode()) % (vocab_size - FIRST_WORD) for w in words]
    return [CLS, *ids, SEP]


def classify(module: BertForSequenceClassification, texts: list[str]) -> list[Label]:
    """One forward for all `texts`: each one's most likely label and its probability."""
    rows = [token_ids(t, module.config.vocab_size) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    logits = module(input_ids=ids, attention_mask=mask).logits
    scores, labels = torch.softmax(logits, dim=-1).max(dim=-1)
    return [
        Label(label=int(label), score=float(score))
        for label, score in zip(labels.tolist(), scores.tolist(), strict=True)
    ]


def build(mode: str, settings: Settings | None = None) -> Service[BertForSequenceClassification]:
    """The service, its prediction declared single or batched."""
    bert = config()
    service = Service(lambda: BertForSequenceClassification(bert), settings=settings)
    if mode == "single":

        @service.predict
        def predict(model: Loaded[BertForSequenceClassification], request: Text) -> Label:
            return classify(model.module, [request.text])[0]

    elif mode == "batch":

        @service.predict_batch
        def predict_batch(
            model: Loaded[BertForSequenceClassification], requests: list[Text]
        ) -> list[Label]:
            return classify(model.module, [r.text for r in requests])

    else:
        raise ValueError(f"mode {mode!r}; accepted: {', '.join(MODES)}")
    return service


def create_app() -> FastAPI:
    """The app for uvicorn's --factory, in BENCH_BATCH_MODE."""
    app: Any = build(os.environ.get("BENCH_BATCH_MODE", "batch")).app
    return app  # type: ignore[no-any-return]
