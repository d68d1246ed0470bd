"""FastAPI side: the 503 of an unavailable model, the body size limit, health/ready/model."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, ParamSpec, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lazyserve import timing
from lazyserve.errors import ModelLoadTimeout, ModelUnavailable
from lazyserve.lazy import LazyModel, Status
from lazyserve.model import Loaded

__all__ = [
    "MAX_BODY_BYTES",
    "TOO_LARGE",
    "UNAVAILABLE",
    "in_worker",
    "model_metadata",
    "model_router",
    "setup_app",
    "unavailable_response",
]

P = ParamSpec("P")
R = TypeVar("R")

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
    requests: dict[str, dict[str, int | float]] = {}  # count stays an int in the JSON


UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ModelUnavailableBody, "description": "The model is loading or cannot load"}
}


class TooLargeBody(BaseModel):
    detail: str


TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": TooLargeBody, "description": "The request body is larger than 6 MiB"}
}


def unavailable_response(exc: ModelUnavailable) -> JSONResponse:
    retry = RETRY_AFTER_LOADING if isinstance(exc, ModelLoadTimeout) else RETRY_AFTER_FAILED
    body = ModelUnavailableBody(detail=ModelUnavailableDetail(message=str(exc)))
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(retry)})


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelUnavailable)
    return unavailable_response(exc)


async def _http_error(request: Request, exc: Exception) -> Any:
    # FastAPI turns every body-parsing error other than JSONDecodeError into "400 There was an
    # error parsing the body": deep nesting (RecursionError), bytes that are not UTF-8 and
    # integers over Python's 4300-digit limit (ValueError) are invalid bodies, so 422; a body
    # sent without Content-Length that outgrows the limit while FastAPI reads it is a 413.
    assert isinstance(exc, HTTPException)
    cause = exc.__cause__
    if isinstance(cause, _TooLarge):
        return _too_large_response(cause.limit)
    if isinstance(cause, RecursionError | ValueError):
        if isinstance(cause, RecursionError):
            msg = "JSON nested too deeply"
        elif isinstance(cause, UnicodeDecodeError):
            msg = "JSON decode error: the body is not UTF-8"
        else:
            msg = "JSON decode error: a number has too many digits"
        detail = [{"type": "json_invalid", "loc": ["body"], "msg": msg}]
        return JSONResponse({"detail": detail}, status_code=422)
    return await http_exception_handler(request, exc)


def _plain(value: Any) -> Any:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return str(value)


async def _invalid(request: Request, exc: Exception) -> Response:
    # FastAPI's own handler echoes each bad "input" back: NaN or Infinity make that reply
    # unserialisable (a 500), a lone surrogate breaks its encoding, a 6 MiB string makes a
    # reply over Lambda's 6 MB response limit. Name the place and the rule, not the input.
    # A body that both a dependency and the endpoint take is validated twice: list each once.
    assert isinstance(exc, RequestValidationError)
    detail: list[dict[str, Any]] = []
    for error in exc.errors():
        item: dict[str, Any] = {
            "type": str(error["type"]),
            "loc": [_plain(p) for p in error["loc"]],
            "msg": str(error["msg"]),
        }
        if error.get("ctx"):
            item["ctx"] = {str(k): _plain(v) for k, v in error["ctx"].items()}
        if item not in detail:
            detail.append(item)
    content = json.dumps({"detail": detail}, ensure_ascii=True, separators=(",", ":"))
    return Response(content, status_code=422, media_type="application/json")


class BodyLimit:
    """A JSON 413 for bodies over `limit` bytes (Starlette's limiter answers in plain text)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await self._too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _too_large_response(self.limit)(scope, receive, send)


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def _too_large_response(limit: int) -> JSONResponse:
    detail = f"the request body is larger than {limit} bytes"
    return JSONResponse({"detail": detail}, status_code=413)


_workers: ThreadPoolExecutor | None = None
_workers_lock = threading.Lock()


async def in_worker(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run blocking work (inference) in a long-lived worker thread; the event loop stays free.

    Starlette's run_in_threadpool (anyio) stops its threads when the root task ends, which
    under Mangum is every invocation: a new thread, and a new OpenMP team for torch, per call.
    """
    global _workers
    with _workers_lock:
        if _workers is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            _workers = ThreadPoolExecutor(max(1, cpus), thread_name_prefix="lazyserve-worker")
    # The caller's context goes along: what the work records reaches its Server-Timing.
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_workers, call)


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
        requests=timing.stats(),
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


class ServerTiming:
    """ASGI middleware: a `Server-Timing` header on every response (`load`, `infer`, `app`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Inside a Lambda invocation the handler has begun a collector already: share it, so
        # the invocation's metrics see what the request recorded.
        token = timing.begin() if timing.current() is None else None
        timings = timing.current()
        assert timings is not None

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("Server-Timing", timings.header())
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            if token is not None:
                timing.end(token)


def setup_app(app: FastAPI, holder: LazyModel[Loaded[Any]]) -> None:
    """Add the model routes, the 503 handler and Lambda's body size limit to `app`."""
    app.add_exception_handler(ModelUnavailable, _unavailable)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(ServerTiming)
    app.include_router(model_router(holder))
