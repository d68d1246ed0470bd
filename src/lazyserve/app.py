"""FastAPI side: the 503 of an unavailable model, the body size limit, health/ready/model."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from lazyserve.errors import ModelLoadTimeout, ModelUnavailable
from lazyserve.lazy import LazyModel, Status
from lazyserve.model import Loaded

__all__ = ["MAX_BODY_BYTES", "model_metadata", "model_router", "setup_app", "unavailable_response"]

# Lambda's synchronous invocation payload limit; API Gateway and Function URLs enforce it too.
MAX_BODY_BYTES = 6 * 1024 * 1024
RETRY_AFTER_LOADING = 2
RETRY_AFTER_FAILED = 5


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: Status


class ModelUnavailableDetail(BaseModel):
    error: Literal["model_unavailable"] = "model_unavailable"
    message: str


class ModelUnavailableBody(BaseModel):
    detail: ModelUnavailableDetail


class Timings(BaseModel):
    fetch_seconds: float
    build_seconds: float
    total_seconds: float


class ModelMetadata(BaseModel):
    status: Status
    source: str | None
    sha256: str | None = None
    size_bytes: int | None = None
    format: str | None = None
    version_id: str | None = None
    etag: str | None = None
    timings: Timings | None = None
    loaded_at: str | None = None
    connections: int | None = None
    loads: int
    load_attempts: int
    last_error: str | None = None


UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ModelUnavailableBody, "description": "The model is loading or cannot load"}
}


def unavailable_response(exc: ModelUnavailable) -> JSONResponse:
    retry = RETRY_AFTER_LOADING if isinstance(exc, ModelLoadTimeout) else RETRY_AFTER_FAILED
    body = ModelUnavailableBody(detail=ModelUnavailableDetail(message=str(exc)))
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(retry)})


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelUnavailable)
    return unavailable_response(exc)


async def _too_deep(request: Request, exc: Exception) -> JSONResponse:
    # json.loads raises RecursionError on deeply nested input; FastAPI only maps JSONDecodeError.
    detail = [{"type": "json_invalid", "loc": ["body"], "msg": "JSON nested too deeply"}]
    return JSONResponse({"detail": detail}, status_code=422)


def model_router(holder: LazyModel[Loaded[Any]]) -> APIRouter:
    """`GET /health`, `GET /ready` and `GET /model` for the model in `holder`."""
    router = APIRouter()

    @router.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(model=holder.status)

    @router.get("/ready", response_model=Health, responses=UNAVAILABLE)
    async def ready() -> Health:
        await holder.aget()
        return Health(model=holder.status)

    @router.get("/model", response_model=ModelMetadata)
    async def model() -> ModelMetadata:
        return model_metadata(holder)

    return router


def model_metadata(holder: LazyModel[Loaded[Any]]) -> ModelMetadata:
    loaded = holder.peek()
    error = holder.last_error
    meta = ModelMetadata(
        status=holder.status,
        source=holder.source,
        loads=holder.loads_succeeded,
        load_attempts=holder.loads_started,
        last_error=str(error) if error is not None else None,
    )
    if loaded is not None:
        info = loaded.info
        meta = meta.model_copy(
            update={
                "source": info.uri,
                "sha256": info.sha256,
                "size_bytes": info.size_bytes,
                "format": info.format,
                "version_id": info.version_id,
                "etag": info.etag,
                "timings": Timings(
                    fetch_seconds=info.fetch_seconds,
                    build_seconds=info.build_seconds,
                    total_seconds=info.total_seconds,
                ),
                "loaded_at": info.loaded_at,
                "connections": info.connections,
            }
        )
    return meta


def setup_app(app: FastAPI, holder: LazyModel[Loaded[Any]]) -> None:
    """Add the model routes, the 503 handler and Lambda's body size limit to `app`."""
    app.add_exception_handler(ModelUnavailable, _unavailable)
    app.add_exception_handler(RecursionError, _too_deep)
    # Starlette's RequestBodyLimitMiddleware, switched on by FastAPI's max_body_size: a 413
    # as soon as Content-Length (or the bytes streamed so far) pass the limit.
    if app.max_body_size is None:
        app.max_body_size = MAX_BODY_BYTES
    app.include_router(model_router(holder))
