"""The JSON shapes lazyserve's own routes answer with, and their OpenAPI entries."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, create_model

from lazyserve.lazy import Status
from lazyserve.model import ModelInfo

__all__ = [
    "FAILED",
    "NOT_FOUND",
    "TIMED_OUT",
    "TOO_LARGE",
    "UNAVAILABLE",
    "Batches",
    "Health",
    "ModelMetadata",
    "ModelUnavailableBody",
    "ModelUnavailableDetail",
    "TimedOutBody",
    "TooLargeBody",
]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: Status


class ModelUnavailableDetail(BaseModel):
    error: Literal["model_unavailable", "model_unloadable"] = "model_unavailable"
    message: str


class ModelUnavailableBody(BaseModel):
    detail: ModelUnavailableDetail


class TooLargeBody(BaseModel):
    detail: str


class TimedOutBody(BaseModel):
    detail: str


class Batches(BaseModel):
    """A batched predict function's calls: the limits in effect, how many calls, their mean and
    last number of requests (None before the first)."""

    max_size: int
    max_wait_ms: float
    calls: int
    mean_size: float | None
    last_size: int | None


class ModelStatus(BaseModel):
    status: Status
    source: str | None
    loads: int
    load_attempts: int
    last_error: str | None = None
    requests: dict[str, dict[str, int | float]] = {}  # count stays an int in the JSON
    refresh: dict[str, int] | None = None  # with LAZYSERVE_REFRESH_SECONDS: what it did
    batches: Batches | None = None  # with @service.predict_batch


# `GET /model`: the holder's status, then every ModelInfo field (None until a load succeeds).
# Derived, so a field added to ModelInfo is one edit.
_optional: dict[str, Any] = {
    name: (field.annotation | None, None)  # type: ignore[operator]
    for name, field in ModelInfo.model_fields.items()
    if name not in ModelStatus.model_fields
}
ModelMetadata = create_model("ModelMetadata", __base__=ModelStatus, **_optional)

UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ModelUnavailableBody,
        "description": "The model is loading, or its load failed in a way a retry may change",
    }
}


class PredictFailedDetail(BaseModel):
    error: Literal["predict_failed", "model_unloadable"]
    message: str
    request_id: str | None = None


class PredictFailedBody(BaseModel):
    detail: PredictFailedDetail


FAILED: dict[int | str, dict[str, Any]] = {
    500: {
        "model": PredictFailedBody,
        "description": "The predict function raised (predict_failed, with a request id), or "
        "the model cannot load until its object or the function's settings change "
        "(model_unloadable)",
    }
}


class ModelNotFoundDetail(BaseModel):
    error: Literal["model_not_found"] = "model_not_found"
    message: str


class ModelNotFoundBody(BaseModel):
    detail: ModelNotFoundDetail


NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ModelNotFoundBody, "description": "No model has that name"}
}
TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": TooLargeBody, "description": "The request body is larger than 6 MiB"}
}
TIMED_OUT: dict[int | str, dict[str, Any]] = {
    408: {
        "model": TimedOutBody,
        "description": "The request body was not complete within the server's body timeout "
        "(LAZYSERVE_BODY_TIMEOUT); the connection is closed",
    }
}
