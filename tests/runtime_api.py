"""A small AWS Lambda Runtime API (the endpoint `AWS_LAMBDA_RUNTIME_API` names) for tests.

It speaks the 2018-06-01 interface the way awslambdaric uses it: events are queued by the test
and handed out by `GET /runtime/invocation/next`; results, invocation errors, init errors and
SnapStart's restore calls are recorded, and the test waits for them. Everything is bounded:
a `/next` with nothing queued answers 500 after `next_timeout` seconds (awslambdaric then exits).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"
PREFIX = "/2018-06-01/runtime"
FUNCTION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:lazyserve-test"


@dataclass(frozen=True)
class Call:
    """One request the runtime client made, in arrival order."""

    seq: int
    at: float  # time.monotonic() on arrival
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    observed: Any = None  # what `observe()` returned on arrival (e.g. an S3 request count)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Result:
    """What the function answered for one invocation: a response or an error."""

    request_id: str
    kind: str  # "response" or "error"
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def _trace_id() -> str:
    # X-Ray's format: Root=1-<epoch seconds, hex>-<96-bit id>;Parent=<64-bit id>;Sampled=0
    root = f"1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]}"
    return f"Root={root};Parent={uuid.uuid4().hex[:16]};Sampled=0"


@dataclass
class _Invocation:
    request_id: str
    body: bytes
    timeout: float
    trace_id: str = field(default_factory=_trace_id)


_STOP = _Invocation("", b"", 0.0)


class RuntimeAPI:
    """The Runtime API on 127.0.0.1 (a free port) in a background thread."""

    def __init__(
        self,
        *,
        next_timeout: float = 60.0,
        observe: Callable[[], Any] | None = None,
    ) -> None:
        self.next_timeout = next_timeout
        self.observe = observe
        self.calls: list[Call] = []
        self.results: dict[str, Result] = {}
        self.violations: list[str] = []  # requests a real Runtime API would refuse
        self._queue: queue.Queue[_Invocation] = queue.Queue()
        self._pending: dict[str, _Invocation] = {}
        self._changed = threading.Condition()
        self._stopped = threading.Event()
        self._server = ThreadingHTTPServer((HOST, 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="runtime-api", daemon=True
        )

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """`host:port`, the value of AWS_LAMBDA_RUNTIME_API."""
        return f"{HOST}:{self._server.server_port}"

    def start(self) -> RuntimeAPI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(_STOP)  # wakes a waiting /next
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- what the test does -------------------------------------------------------------------

    def invoke(self, event: Any, *, timeout: float = 30.0) -> str:
        """Queue one invocation (a JSON-serialisable event); return its request id."""
        invocation = _Invocation(str(uuid.uuid4()), json.dumps(event).encode(), timeout)
        with self._changed:
            self._pending[invocation.request_id] = invocation
        self._queue.put(invocation)
        return invocation.request_id

    def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float,
        *,
        what: str = "condition",
        abort: Callable[[], str | None] | None = None,
    ) -> None:
        """Block until `predicate()` holds; `abort()` returning a reason ends the wait early."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                reason = abort() if abort is not None else None
                if reason is not None:
                    if predicate():  # it came true just before the abort reason did
                        return
                    raise AssertionError(f"gave up waiting for {what}: {reason}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {what} within {timeout:g}s")
                self._changed.wait(min(left, 0.05))

    def wait_result(
        self,
        request_id: str,
        timeout: float = 30.0,
        *,
        abort: Callable[[], str | None] | None = None,
    ) -> Result:
        """The response or error posted for `request_id`."""
        self.wait_for(
            lambda: request_id in self.results,
            timeout,
            what=f"result for request {request_id}",
            abort=abort,
        )
        return self.results[request_id]

    def calls_to(self, method: str, suffix: str) -> list[Call]:
        """Recorded calls whose path ends with `suffix` (e.g. "/invocation/next")."""
        with self._changed:
            return [c for c in self.calls if c.method == method and c.path.endswith(suffix)]

    def wait_call(
        self,
        method: str,
        suffix: str,
        timeout: float = 30.0,
        *,
        count: int = 1,
        abort: Callable[[], str | None] | None = None,
    ) -> Call:
        """Wait until the client made `count` such calls; return the last of them."""
        self.wait_for(
            lambda: len(self.calls_to(method, suffix)) >= count,
            timeout,
            what=f"{method} {suffix} (#{count})",
            abort=abort,
        )
        return self.calls_to(method, suffix)[count - 1]

    @property
    def init_errors(self) -> list[Call]:
        return self.calls_to("POST", "/init/error")

    # -- the HTTP side ------------------------------------------------------------------------

    def _record(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Call:
        observed = self.observe() if self.observe is not None else None
        with self._changed:
            call = Call(len(self.calls), time.monotonic(), method, path, headers, body, observed)
            self.calls.append(call)
            self._changed.notify_all()
        return call

    def _next(self) -> tuple[int, dict[str, str], bytes]:
        try:
            invocation = self._queue.get(timeout=self.next_timeout)
        except queue.Empty:
            invocation = _STOP
        if invocation is _STOP or self._stopped.is_set():
            self._queue.put(_STOP)  # for any other waiter
            error = {"errorType": "TestRuntimeStopped", "errorMessage": "no more invocations"}
            return 500, {}, json.dumps(error).encode()
        deadline_ms = int((time.time() + invocation.timeout) * 1000)
        headers = {
            "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
            "Lambda-Runtime-Deadline-Ms": str(deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": FUNCTION_ARN,
            "Lambda-Runtime-Trace-Id": invocation.trace_id,
            "Content-Type": "application/json",
        }
        return 200, headers, invocation.body

    def _post_result(self, request_id: str, kind: str, call: Call) -> int:
        with self._changed:
            if request_id not in self._pending:
                self.violations.append(f"{kind} for unknown or finished request {request_id}")
                return 400
            del self._pending[request_id]
            self.results[request_id] = Result(request_id, kind, call.body, call.headers)
            self._changed.notify_all()
        return 202

    def _route(self, method: str, path: str, call: Call) -> tuple[int, dict[str, str], bytes]:
        if not path.startswith(PREFIX):
            return 404, {}, b""
        rest = path[len(PREFIX) :]
        if method == "GET" and rest == "/invocation/next":
            return self._next()
        if method == "GET" and rest == "/restore/next":
            # SnapStart: the "snapshot" is taken and restored at once.
            return 200, {}, b""
        if method == "POST" and rest in ("/init/error", "/restore/error"):
            return 202, {}, b'{"status":"OK"}'
        parts = rest.split("/")  # ["", "invocation", id, "response" | "error"]
        if method == "POST" and len(parts) == 4 and parts[1] == "invocation":
            if parts[3] in ("response", "error"):
                return self._post_result(parts[2], parts[3], call), {}, b'{"status":"OK"}'
        self.violations.append(f"unexpected {method} {path}")
        return 404, {}, b""

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1 keep-alive, as libcurl in awslambdaric reuses its connection; every
            # answer therefore carries a Content-Length.
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                path = self.path.split("?", 1)[0]
                call = api._record(self.command, path, headers, body)
                status, extra, payload = api._route(self.command, path, call)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                if "Content-Type" not in extra:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _serve
            do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test reads `api.calls` instead

        return Handler
