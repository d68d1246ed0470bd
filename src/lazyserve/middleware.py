"""ASGI middleware: Lambda's body size limit as a JSON 413, the Server-Timing header, and EMF
metrics per request for servers other than Lambda."""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lazyserve import timing
from lazyserve.error_handlers import BodyTooLarge, too_large_response
from lazyserve.metrics import ModelMetrics

__all__ = ["MAX_BODY_BYTES", "BodyLimit", "MetricsMiddleware", "ServerTiming"]

# Lambda's synchronous invocation payload limit; API Gateway and Function URLs enforce it too.
MAX_BODY_BYTES = 6 * 1024 * 1024


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
            await too_large_response(self.limit)(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await too_large_response(self.limit)(scope, receive, send)


class ServerTiming:
    """A `Server-Timing` header on every response (`load`, `infer`, `app`)."""

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


class MetricsMiddleware:
    """Publishes EMF metrics per HTTP request, for servers other than Lambda (uvicorn)."""

    def __init__(self, app: ASGIApp, metrics: ModelMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = timing.begin()
        try:
            await self.app(scope, receive, send)
        finally:
            self.metrics.publish(timing.current())
            timing.end(token)
