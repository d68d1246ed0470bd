"""ASGI middleware: Lambda's body size limit as a JSON 413 with the Server-Timing header (one
layer), and EMF metrics per request for servers other than Lambda."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lazyserve import timing
from lazyserve.error_handlers import BodyTooLarge, too_large_response
from lazyserve.metrics import ModelMetrics

__all__ = ["MAX_BODY_BYTES", "Edge", "MetricsMiddleware"]

# Lambda's synchronous invocation payload limit; API Gateway and Function URLs enforce it too.
MAX_BODY_BYTES = 6 * 1024 * 1024


class Edge:
    """What every HTTP request passes first: Lambda's body size limit, answered with a JSON 413
    (Starlette's own limiter answers in plain text), and a `Server-Timing` header on every
    response (`load`, `infer`, `app`). One layer for both: each ASGI layer costs every request
    a few coroutine calls (about 40 us each on a Lambda-sized CPU, benchmarks/README.md)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Inside a Lambda invocation the handler has begun a collector already: share it, so
        # the invocation's metrics see what the request recorded.
        token = timing.begin() if timing.current() is None else None
        timings = timing.current()
        assert timings is not None
        started = False

        async def send_with_header(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                header = (b"server-timing", timings.header().encode("latin-1"))
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            length = _content_length(scope)
            if length is None:
                # No Content-Length (chunked): count the bytes as they come.
                await self.app(scope, self._limited(receive), send_with_header)
            elif length > self.limit:
                raise BodyTooLarge(self.limit)  # answered below, before any byte is read
            else:
                await self.app(scope, receive, send_with_header)
        except BodyTooLarge:
            if started:
                raise
            await too_large_response(self.limit)(scope, receive, send_with_header)
        finally:
            if token is not None:
                timing.end(token)

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        return limited_receive


def _content_length(scope: Scope) -> int | None:
    # Read from the raw header list: building Starlette's Headers for one lookup costs more.
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


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
