"""How errors become HTTP answers: the contract's 503 for an unavailable model, JSON 422s that
never echo the input, and 413 for bodies over Lambda's payload limit."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from lazyserve.errors import ModelLoadTimeout, ModelNotFound, ModelUnavailable
from lazyserve.schemas import ModelUnavailableBody, ModelUnavailableDetail

__all__ = [
    "BodyTooLarge",
    "add_error_handlers",
    "too_large_response",
    "unavailable_response",
]

MAX_ERRORS = 20
"""Validation errors a 422 lists; the rest are counted in one last entry."""
RETRY_AFTER_LOADING = 2
RETRY_AFTER_FAILED = 5


class BodyTooLarge(Exception):
    """Raised by the body limit while a body without Content-Length streams in."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def unavailable_response(exc: ModelUnavailable) -> JSONResponse:
    retry = RETRY_AFTER_LOADING if isinstance(exc, ModelLoadTimeout) else RETRY_AFTER_FAILED
    body = ModelUnavailableBody(detail=ModelUnavailableDetail(message=str(exc)))
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(retry)})


def too_large_response(limit: int) -> JSONResponse:
    detail = f"the request body is larger than {limit} bytes"
    return JSONResponse({"detail": detail}, status_code=413)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    body = {"detail": {"error": "model_not_found", "message": str(exc)}}
    return JSONResponse(body, status_code=404)


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
    if isinstance(cause, BodyTooLarge):
        return too_large_response(cause.limit)
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
    content = json.dumps({"detail": detail}, ensure_ascii=True, separators=(",", ":"))
    return Response(content, status_code=422, media_type="application/json")


def add_error_handlers(app: FastAPI) -> None:
    """The 503, 404, 422 and 413 answers above, on `app`."""
    app.add_exception_handler(ModelUnavailable, _unavailable)
    app.add_exception_handler(ModelNotFound, _not_found)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
