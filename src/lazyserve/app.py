"""Wires lazyserve's HTTP pieces into a FastAPI app: error answers, body limit, Server-Timing
and the model routes."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from lazyserve.error_handlers import add_error_handlers
from lazyserve.lazy import LazyModel
from lazyserve.middleware import BODY_TIMEOUT, MAX_BODY_BYTES, Edge
from lazyserve.model import Loaded
from lazyserve.routes import model_router

__all__ = ["setup_app"]


def setup_app(
    app: FastAPI,
    holder: LazyModel[Loaded[Any]] | None = None,
    *,
    body_timeout: float | None = BODY_TIMEOUT,
) -> None:
    """Add the 503/404/422/413/408 answers, Lambda's body size limit, the body deadline
    (`body_timeout` seconds; None: none), Server-Timing and, given a holder, its model routes
    (`/health`, `/ready`, `/model`) to `app`."""
    add_error_handlers(app)
    app.add_middleware(Edge, limit=MAX_BODY_BYTES, body_timeout=body_timeout)
    if holder is not None:
        app.include_router(model_router(holder))
