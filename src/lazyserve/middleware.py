"""ASGI middleware: Lambda's body size limit as a JSON 413, a deadline for the body (408) and
the Server-Timing header (one layer), and EMF metrics per request for servers other than
Lambda."""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lazyserve import timing
from lazyserve.error_handlers import (
    BodyTimeout,
    BodyTooLarge,
    timeout_response,
    too_large_response,
)
from lazyserve.metrics import ModelMetrics
from lazyserve.settings import DEFAULT_BODY_TIMEOUT

__all__ = ["BODY_TIMEOUT", "MAX_BODY_BYTES", "Edge", "MetricsMiddleware"]

# Lambda's synchronous invocation payload limit; API Gateway and Function URLs enforce it too.
MAX_BODY_BYTES = 6 * 1024 * 1024
BODY_TIMEOUT = DEFAULT_BODY_TIMEOUT
"""Seconds from a request's start by which its body must be complete (LAZYSERVE_BODY_TIMEOUT)."""


class Edge:
    """What every HTTP request passes first: Lambda's body size limit, answered with a JSON 413
    (Starlette's own limiter answers in plain text); a deadline for the body, `body_timeout`
    seconds from the request's start, answered with a JSON 408 that closes the connection
    (uvicorn waits for a body as long as the client keeps the connection open); and a
    `Server-Timing` header on every response (`load`, `infer`, `app`). One layer for all: each
    ASGI layer costs every request a few coroutine calls (about 40 us each on a Lambda-sized
    CPU, benchmarks/README.md)."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int = MAX_BODY_BYTES,
        body_timeout: float | None = BODY_TIMEOUT,
    ) -> None:
        self.app = app
        self.limit = limit
        self.body_timeout = body_timeout

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

        # Mangum hands the app the whole body at once: a deadline has nothing to wait for.
        if self.body_timeout is not None and "aws.event" not in scope:
            receive = _by_deadline(receive, self.body_timeout)
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
        except BodyTimeout as exc:
            if started:
                raise
            await timeout_response(exc.seconds)(scope, receive, send_with_header)
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


def _by_deadline(receive: Receive, seconds: float) -> Receive:
    """`receive`, raising BodyTimeout once `seconds` have passed since now (the request's start)
    while the body is not complete; after the body, receive waits for the disconnect as long
    as it takes."""
    deadline = anyio.current_time() + seconds
    complete = False

    async def receive_by_deadline() -> Message:
        nonlocal complete
        if complete:
            return await receive()
        try:
            with anyio.fail_after(deadline - anyio.current_time()):
                message = await receive()
        except TimeoutError:
            raise BodyTimeout(seconds) from None  # the deadline, not a failure: no cause
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return receive_by_deadline


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
