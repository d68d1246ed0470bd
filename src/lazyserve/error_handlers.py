"""How errors become HTTP answers, all JSON and worded by lazyserve:

- 503 with Retry-After, `model_unavailable`: the model is loading (ModelLoadTimeout), or its load
  failed in a way a retry may change (throttling, a timeout, an S3 5xx: `retryable` errors);
- 500, `model_unloadable`: it cannot load until its object or the function's configuration
  changes (ModelFormatError, ModelIntegrityError, ModelTooLarge, ModelMissing, AccessDenied);
- 404, `model_not_found`: no model has that name (many models);
- 500, `predict_failed`, with a request id: the predict function (or any route) raised;
- 422 that never echo the input, 413 for bodies over Lambda's payload limit, and 408 (the
  connection closed) for a body not complete within the body timeout."""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError, ResponseValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from lazyserve.errors import (
    LazyserveError,
    ModelLoadTimeout,
    ModelNotFound,
    ModelUnavailable,
    PredictFailed,
)
from lazyserve.logs import request_id
from lazyserve.schemas import ModelUnavailableBody, ModelUnavailableDetail

__all__ = [
    "MAX_MESSAGE",
    "BodyTimeout",
    "BodyTooLarge",
    "add_error_handlers",
    "bounded",
    "predict_failed",
    "response_invalid",
    "timeout_response",
    "too_large_response",
    "unavailable_response",
]

log = logging.getLogger("lazyserve")

MAX_MESSAGE = 2000
"""Characters of an error message an answer carries; the log has the rest."""

MAX_ERRORS = 20
"""Validation errors a 422 lists; the rest are counted in one last entry."""
RETRY_AFTER_LOADING = 2
RETRY_AFTER_FAILED = 5


class BodyTooLarge(Exception):
    """Raised by the body limit while a body without Content-Length streams in."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class BodyTimeout(Exception):
    """Raised by the body deadline when a request body is not complete `seconds` after the
    request started."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text`, cut to `limit` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unavailable_response(exc: ModelUnavailable) -> JSONResponse:
    message = bounded(str(exc))
    if not exc.retryable:
        body = ModelUnavailableBody(
            detail=ModelUnavailableDetail(error="model_unloadable", message=message)
        )
        return JSONResponse(body.model_dump(), status_code=500)
    retry = RETRY_AFTER_LOADING if isinstance(exc, ModelLoadTimeout) else RETRY_AFTER_FAILED
    body = ModelUnavailableBody(detail=ModelUnavailableDetail(message=message))
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(retry)})


def predict_failed(exc: Exception, function: str) -> Exception:
    """What to raise for `exc` from the predict function: lazyserve's own errors and HTTP
    exceptions the function raised on purpose as they are; anything else is logged with its
    traceback and becomes PredictFailed, a JSON 500 naming the request id."""
    if isinstance(exc, HTTPException | LazyserveError | RequestValidationError):
        return exc
    rid = request_id() or uuid.uuid4().hex
    log.error(
        "%s() raised %s", function, type(exc).__name__, exc_info=exc, extra={"request_id": rid}
    )
    return PredictFailed(rid)


def response_invalid(exc: Exception, function: str) -> PredictFailed:
    """PredictFailed for an answer of the predict function that its declared response type
    refuses (or that is not JSON), logged under the request id."""
    rid = request_id() or uuid.uuid4().hex
    log.error(
        "%s() returned an answer that does not fit its declared response type (or is not JSON): %s",
        function,
        bounded(str(exc), 500),
        extra={"request_id": rid},
    )
    return PredictFailed(rid)


def _failed_response(rid: str) -> JSONResponse:
    error = PredictFailed(rid)
    body = {"detail": {"error": "predict_failed", "message": str(error), "request_id": rid}}
    return JSONResponse(body, status_code=500)


async def _predict_failed(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PredictFailed)
    return _failed_response(exc.request_id)


async def _response_invalid(request: Request, exc: Exception) -> JSONResponse:
    # The predict function (the route FastAPI names after it) returned something its declared
    # response type refuses.
    route = request.scope.get("route")
    return _failed_response(response_invalid(exc, getattr(route, "name", "predict")).request_id)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's ServerErrorMiddleware answers with this, then re-raises for the server to log
    # (uvicorn, Mangum) without the id the answer names: logged here under it too. A route
    # without a declared response type whose answer FastAPI cannot encode ends here.
    rid = request_id() or uuid.uuid4().hex
    route = getattr(request.scope.get("route"), "name", None)
    where = f"{route}()" if route else f"{request.method} {request.url.path}"
    log.error("%s raised %s", where, type(exc).__name__, exc_info=exc, extra={"request_id": rid})
    return _failed_response(rid)


def too_large_response(limit: int) -> JSONResponse:
    detail = f"the request body is larger than {limit} bytes"
    return JSONResponse({"detail": detail}, status_code=413)


def timeout_response(seconds: float) -> JSONResponse:
    """408, and the connection closed: the rest of the body may still be on its way."""
    detail = (
        f"the request body was not complete {seconds:g} s after the request started (the "
        "server's body timeout, LAZYSERVE_BODY_TIMEOUT)"
    )
    return JSONResponse({"detail": detail}, status_code=408, headers={"Connection": "close"})


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    body = {"detail": {"error": "model_not_found", "message": bounded(str(exc))}}
    return JSONResponse(body, status_code=404)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelUnavailable)
    return unavailable_response(exc)


async def _http_error(request: Request, exc: Exception) -> Any:
    # FastAPI turns every body-parsing error other than JSONDecodeError into "400 There was an
    # error parsing the body": deep nesting (RecursionError), bytes that are not UTF-8 and
    # integers over Python's 4300-digit limit (ValueError) are invalid bodies, so 422; a body
    # sent without Content-Length that outgrows the limit while FastAPI reads it is a 413, and
    # one that is not complete within the body timeout a 408.
    assert isinstance(exc, HTTPException)
    cause = exc.__cause__
    if isinstance(cause, BodyTooLarge):
        return too_large_response(cause.limit)
    if isinstance(cause, BodyTimeout):
        return timeout_response(cause.seconds)
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
    # reply over Lambda's 6 MB response limit. Name the place and the rule, not the input; list
    # at most MAX_ERRORS of them (a 256x64 body of bad numbers has 16,384) and count the rest.
    assert isinstance(exc, RequestValidationError)
    detail: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    more = 0
    for error in exc.errors():
        # One pass, constant work per error: an item is built only for the ones listed.
        key = (error["type"], tuple(error["loc"]), error["msg"])
        if key in seen:
            continue
        seen.add(key)
        if len(detail) == MAX_ERRORS:
            more += 1
            continue
        item: dict[str, Any] = {
            "type": str(error["type"]),
            "loc": [_plain(p) for p in error["loc"]],
            "msg": str(error["msg"]),
        }
        if error.get("ctx"):
            item["ctx"] = {str(k): _plain(v) for k, v in error["ctx"].items()}
        detail.append(item)
    if more:
        detail.append(
            {
                "type": "too_many_errors",
                "loc": ["body"],
                "msg": f"{more} more errors not listed (at most {MAX_ERRORS} are)",
            }
        )
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        # curl -d without -H sends application/x-www-form-urlencoded: the JSON is never read.
        detail.append(
            {
                "type": "content_type",
                "loc": ["header", "content-type"],
                "msg": f"the body was sent as {media[:80]}; send JSON with the header "
                "content-type: application/json (curl: -H 'content-type: application/json')",
            }
        )
    content = json.dumps({"detail": detail}, ensure_ascii=True, separators=(",", ":"))
    return Response(content, status_code=422, media_type="application/json")


def add_error_handlers(app: FastAPI) -> None:
    """The answers above, on `app`."""
    app.add_exception_handler(ModelUnavailable, _unavailable)
    app.add_exception_handler(PredictFailed, _predict_failed)
    app.add_exception_handler(ResponseValidationError, _response_invalid)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(ModelNotFound, _not_found)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
