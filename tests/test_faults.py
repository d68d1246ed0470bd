"""Faults while loading, over real HTTP: moto's S3 server made to misbehave (S3 error answers,
throttling, broken bodies, a wrong digest), a raw TCP front that resets connections mid-body or
accepts them and never answers. Each fault is driven through the reference app, then cleared."""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from types import FrameType, ModuleType, TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import boto3
import httpx
import pytest

import lazyserve.sources.s3client
from lazyserve.errors import ModelUnavailable
from tests.helpers import (
    BUCKET,
    DIGIT_8,
    KEY,
    PART_SIZE,
    PARTS,
    REGION,
    WEIGHTS_BYTES,
    WEIGHTS_SHA256,
    ImportHandler,
    asgi_client,
    assert_prediction_shape,
    assert_unavailable,
    assert_unloadable,
    is_weights_get,
    load_event,
    recheck_now,
    s3_error_app,
    s3_uri,
    weights_gets,
)
from tests.s3server import CountingS3Server, Request, WSGIApp

Mode = Literal["relay", "reset", "stall"]
API_GATEWAY_TIMEOUT = 29.0
LOAD_WAIT = 25.0  # LAZYSERVE_LOAD_WAIT's default: a request waits this long for a load


# --- a raw TCP front for moto's server ------------------------------------------------------------


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Bytes up to and including the blank line that ends an HTTP head, and any bytes after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the end of the head")
        data += chunk
    end = data.index(b"\r\n\r\n") + 4
    return data[:end], data[end:]


def _header(head: bytes, name: str) -> str | None:
    match = re.search(rb"(?im)^" + name.encode() + rb":\s*(.*?)\r$", head)
    return match.group(1).decode() if match else None


class RawFront:
    """A TCP listener on 127.0.0.1:0 in front of moto's server. `relay` passes each exchange
    through; `reset` sends a weights GET's status, headers and half its body, then resets the
    connection (RST, no FIN); `stall` accepts connections and never answers them."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._listener = socket.create_server(("127.0.0.1", 0))
        host, port = self._listener.getsockname()
        self.endpoint = f"http://{host}:{port}"
        self.mode: Mode = "relay"
        self.accepted = 0
        self.resets = 0
        self.request_ids: list[str] = []  # of the responses cut short
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="raw-front", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # the listener was closed: stop
                return
            with self._lock:
                self.accepted += 1
                if self.mode == "stall":
                    self._held.append(conn)
                    continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            with conn, socket.create_connection(self._upstream, timeout=30) as upstream:
                request, extra = _read_head(conn)
                length = int(_header(request, "content-length") or 0)
                while len(extra) < length:
                    extra += conn.recv(65536)
                upstream.sendall(request + extra)
                head, body = _read_head(upstream)
                cut = (
                    self.mode == "reset"
                    and request.startswith(f"GET /{BUCKET}/{KEY}".encode())
                    and head.split(b" ", 2)[1] in (b"200", b"206")
                )
                if cut:
                    half = int(_header(head, "content-length") or 0) // 2
                    while len(body) < half:
                        body += upstream.recv(65536)
                    conn.sendall(head + body[:half])
                    with self._lock:
                        self.resets += 1
                        self.request_ids.append(_header(head, "x-amzn-requestid") or "")
                    # Linger 0: close() sends RST at once instead of FIN.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                conn.sendall(head + body)
                while chunk := upstream.recv(65536):  # moto closes after each response
                    conn.sendall(chunk)
        except OSError:
            pass  # the client gave up (e.g. its read timed out): nothing to relay to

    def stop(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self._listener.close()
        self._thread.join(5)
        with self._lock:
            for conn in self._held:
                conn.close()
            self._held.clear()


# --- S3 answers that break ------------------------------------------------------------------------


def short_body(request: Request, request_id: str) -> WSGIApp:
    """A 206 for the requested range that announces its full length and sends half of it."""
    match = re.fullmatch(r"bytes=(\d+)-(\d+)", request.range or "")
    assert match is not None, request.range
    start, end = int(match.group(1)), min(int(match.group(2)), len(WEIGHTS_BYTES) - 1)
    data = WEIGHTS_BYTES[start : end + 1]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response(
            "206 Partial Content",
            [
                ("Content-Type", "binary/octet-stream"),
                ("Content-Range", f"bytes {start}-{end}/{len(WEIGHTS_BYTES)}"),
                ("Content-Length", str(len(data))),
                ("ETag", '"0123456789abcdef0123456789abcdef"'),
                ("x-amz-request-id", request_id),
            ],
        )
        return [data[: len(data) // 2]]  # werkzeug then closes the connection

    return app


class Throttle:
    """503 SlowDown for the first `count` GETs of the weights, then moto answers again."""

    def __init__(self, count: int) -> None:
        self.left = count
        self._lock = threading.Lock()
        self._app = s3_error_app("503 Slow Down", "SlowDown", request_id="LZFAULT-SLOWDOWN")

    def __call__(self, request: Request) -> WSGIApp | None:
        if not is_weights_get(request):
            return None
        with self._lock:
            if self.left <= 0:
                return None
            self.left -= 1
        return self._app


def corrupted(data: bytes) -> bytes:
    """The same file with a few bytes of the last tensor changed (still a safetensors file)."""
    tail = bytes(b ^ 0xFF for b in data[-8:])
    return data[:-8] + tail


CORRUPTED_SHA256 = hashlib.sha256(corrupted(WEIGHTS_BYTES)).hexdigest()


@dataclass(frozen=True)
class Fault:
    """How to make S3 misbehave, and what the 503 message and the log line must then name."""

    arm: Callable[[CountingS3Server, RawFront, Any], None]
    disarm: Callable[[CountingS3Server, RawFront, Any], None]
    names: tuple[str, ...]
    request_id: str | None = None  # a fixed id the log line must carry
    front_request_id: bool = False  # the id of a response the front cut short


def _fault(
    app_for: Callable[[Request], WSGIApp],
) -> Callable[[CountingS3Server, RawFront, Any], None]:
    def arm(s3: CountingS3Server, front: RawFront, client: Any) -> None:
        s3.fault = lambda request: app_for(request) if is_weights_get(request) else None

    return arm


def _no_fault(s3: CountingS3Server, front: RawFront, client: Any) -> None:
    s3.fault = None


def _error_fault(status: str, code: str) -> Fault:
    request_id = f"LZFAULT-{code.upper()}"
    app = s3_error_app(status, code, request_id=request_id)
    return Fault(_fault(lambda _: app), _no_fault, (BUCKET, KEY, code), request_id)


def _set_mode(mode: Mode) -> Callable[[CountingS3Server, RawFront, Any], None]:
    def set_mode(s3: CountingS3Server, front: RawFront, client: Any) -> None:
        front.mode = mode

    return set_mode


def _put(data: bytes) -> Callable[[CountingS3Server, RawFront, Any], None]:
    def put(s3: CountingS3Server, front: RawFront, client: Any) -> None:
        client.put_object(Bucket=BUCKET, Key=KEY, Body=data)

    return put


FAULTS: dict[str, Fault] = {
    "NoSuchKey": _error_fault("404 Not Found", "NoSuchKey"),
    "NoSuchBucket": _error_fault("404 Not Found", "NoSuchBucket"),
    "AccessDenied": _error_fault("403 Forbidden", "AccessDenied"),
    "reset-mid-body": Fault(
        _set_mode("reset"), _set_mode("relay"), (BUCKET, KEY, "bytes 0-"), front_request_id=True
    ),
    "short-body": Fault(
        _fault(lambda request: short_body(request, "LZFAULT-SHORTBODY")),
        _no_fault,
        (BUCKET, KEY, "bytes 0-"),
        "LZFAULT-SHORTBODY",
    ),
    # The object is replaced by other bytes: the digest the deployment pins no longer matches.
    "wrong-sha256": Fault(
        _put(corrupted(WEIGHTS_BYTES)),
        _put(WEIGHTS_BYTES),
        (BUCKET, KEY, WEIGHTS_SHA256, CORRUPTED_SHA256),
    ),
}
# S3 answered 200/206 with a request id, then the body broke.
BROKEN_BODIES = ["reset-mid-body", "short-body"]
# Faults a retry cannot change: the model's answer is a 500 until the object changes, and the
# failure is remembered (no load per request); the others are 503s the next request retries.
LASTING = {"NoSuchKey", "NoSuchBucket", "AccessDenied", "wrong-sha256"}


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def front(s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[RawFront]:
    """The raw TCP front, relaying to moto, with the S3 client pointed at it."""
    raw = RawFront(s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", raw.endpoint)
    try:
        yield raw
    finally:
        raw.stop()


@pytest.fixture
def seeding_client(s3: CountingS3Server) -> Any:
    """A client straight to moto (not through the front), for replacing the object."""
    return boto3.client("s3", region_name=REGION, endpoint_url=s3.endpoint)


@pytest.fixture
def mod(front: RawFront, import_handler: ImportHandler) -> ModuleType:
    """The reference function, loading s3://BUCKET/KEY through the front, digest pinned."""
    return import_handler(
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),
        LAZYSERVE_MODEL_SHA256=WEIGHTS_SHA256,
    )


@pytest.fixture
async def client(mod: ModuleType) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(mod) as http:
        yield http


# --- helpers --------------------------------------------------------------------------------------


def load_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "lazyserve" and r.levelno == logging.ERROR and "load failed" in r.getMessage()
    ]


def _frames(tb: TracebackType | None) -> Iterator[FrameType]:
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def large_buffers_held_by(error: BaseException | None, size: int) -> list[str]:
    """Buffers of at least `size` bytes that the error (its chain, its tracebacks' frames) keeps
    alive: a failed load must not pin the bytes it had fetched until the next load succeeds."""
    found: list[str] = []
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for frame in _frames(error.__traceback__):
            for name, value in frame.f_locals.items():
                if isinstance(value, bytearray | memoryview) and len(value) >= size:
                    found.append(f"{frame.f_code.co_name}.{name}")
        error = error.__cause__ or error.__context__
    return found


async def assert_serves_again(client: httpx.AsyncClient) -> None:
    response = await client.post("/predict", json={"inputs": [DIGIT_8]})
    assert response.status_code == 200, response.text
    assert_prediction_shape(response.json(), 1)
    assert response.json()["predictions"][0]["label"] == 8
    assert (await client.get("/ready")).status_code == 200
    assert (await client.get("/health")).json() == {"status": "ok", "model": "loaded"}


# --- each fault: 503, /health 200, /ready 503, logged, nothing kept; then 200 ---------------------


async def fail_twice(
    fault: Fault,
    s3: CountingS3Server,
    front: RawFront,
    seeding: Any,
    client: httpx.AsyncClient,
    lasting: bool = False,
) -> None:
    """Arm the fault; a request and a /ready each meet it (two failed loads, or one remembered
    when the fault is `lasting`), /health answers."""
    answer = assert_unloadable if lasting else assert_unavailable
    fault.arm(s3, front, seeding)
    response = await client.post("/predict", json={"inputs": [DIGIT_8]})
    assert response.headers["content-type"] == "application/json"
    answer(response.status_code, response.headers, response.json(), *fault.names)

    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "model": "failed"}
    ready = await client.get("/ready")  # a load of its own, or the failure remembered
    answer(ready.status_code, ready.headers, ready.json(), *fault.names)
    assert (await client.get("/health")).status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize("name", FAULTS)
async def test_fault_is_a_503_then_the_next_request_loads(
    name: str,
    s3: CountingS3Server,
    front: RawFront,
    seeding_client: Any,
    mod: ModuleType,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fault = FAULTS[name]
    lasting = name in LASTING
    await fail_twice(fault, s3, front, seeding_client, client, lasting)

    # Logged once per failed load, naming the cause (and S3's request id where S3 answered).
    lines = load_failures(caplog)
    assert len(lines) == mod.service.model.loads_started == (1 if lasting else 2), lines
    for line in lines:
        for word in fault.names:
            assert word in line, (word, line)
        if fault.request_id is not None and name not in BROKEN_BODIES:
            assert f"request id {fault.request_id}" in line, line

    # Nothing half-loaded is served.
    assert mod.service.model.peek() is None
    assert mod.service.model.status == "failed"

    fault.disarm(s3, front, seeding_client)
    if lasting:  # the next look at the object sees it changed (or readable)
        recheck_now(mod.service.model)
    s3.clear()
    await assert_serves_again(client)
    assert weights_gets(s3) == PARTS
    assert mod.service.model.loads_started == (2 if lasting else 3)
    assert mod.service.model.loads_succeeded == 1


@pytest.mark.anyio
@pytest.mark.parametrize("name", BROKEN_BODIES)
async def test_a_broken_body_is_logged_with_the_responses_request_id(
    name: str,
    s3: CountingS3Server,
    front: RawFront,
    seeding_client: Any,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # S3 had answered (200/206 with x-amz-request-id) before the body broke: that id is what AWS
    # support asks for, so the log line should carry it as it does for S3's error answers.
    fault = FAULTS[name]
    await fail_twice(fault, s3, front, seeding_client, client)
    ids = front.request_ids if fault.front_request_id else [fault.request_id or ""]
    for line in load_failures(caplog):
        assert any(f"request id {rid}" in line for rid in ids), (ids, line)


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["reset-mid-body", "short-body", "wrong-sha256"])
async def test_a_failed_load_keeps_none_of_the_fetched_bytes(
    name: str,
    s3: CountingS3Server,
    front: RawFront,
    seeding_client: Any,
    mod: ModuleType,
    client: httpx.AsyncClient,
) -> None:
    # These faults strike after the load has allocated and begun filling its buffer. The error
    # outlives the load (the holder keeps it for /model until a load succeeds): if its chain or
    # tracebacks pinned the buffer, the retry would hold the weights twice (OOM on Lambda).
    await fail_twice(FAULTS[name], s3, front, seeding_client, client, name in LASTING)
    size = len(WEIGHTS_BYTES) // 2
    assert large_buffers_held_by(mod.service.model.last_error, size) == []
    # The same after a direct invocation (no HTTP exception handler in between).
    with pytest.raises(ModelUnavailable):
        mod.handler(load_event("direct-predict"), None)
    assert mod.service.model.peek() is None
    assert large_buffers_held_by(mod.service.model.last_error, size) == []


# --- throttling: a short burst is absorbed, a longer outage fails one load ------------------------


@pytest.mark.anyio
async def test_a_short_slowdown_burst_is_absorbed_within_one_load(
    s3: CountingS3Server, mod: ModuleType, client: httpx.AsyncClient
) -> None:
    burst = lazyserve.sources.s3client.ATTEMPTS - 1
    s3.fault = Throttle(burst)
    response = await client.post("/predict", json={"inputs": [DIGIT_8]})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == 8
    assert mod.service.model.loads_started == 1
    assert weights_gets(s3) == PARTS + burst  # the throttled GETs were retried


@pytest.mark.anyio
async def test_a_slowdown_outage_fails_the_load_then_the_next_request_recovers(
    s3: CountingS3Server,
    mod: ModuleType,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Throttled for longer than the client keeps retrying: the load gives up with S3's code.
    throttle = Throttle(100)
    s3.fault = throttle
    response = await client.post("/predict", json={"inputs": [DIGIT_8]})
    assert_unavailable(
        response.status_code, response.headers, response.json(), BUCKET, KEY, "SlowDown"
    )
    attempts = weights_gets(s3)
    assert (await client.get("/health")).json() == {"status": "ok", "model": "failed"}
    assert mod.service.model.peek() is None
    [line] = load_failures(caplog)
    assert "SlowDown" in line
    assert "request id LZFAULT-SLOWDOWN" in line

    throttle.left = 0  # the outage is over; nothing else changes
    s3.clear()
    response = await client.post("/predict", json={"inputs": [DIGIT_8]})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == 8
    assert weights_gets(s3) == PARTS
    assert mod.service.model.loads_started == 2
    # One load makes ATTEMPTS attempts at a throttled GET, no more.
    assert attempts == lazyserve.sources.s3client.ATTEMPTS


# --- a stalled endpoint: cut by the real timeouts, inside API Gateway's 29 s ----------------------


@pytest.mark.anyio
async def test_a_stalled_endpoint_is_a_503_well_inside_api_gateways_timeout(
    s3: CountingS3Server, front: RawFront, mod: ModuleType, client: httpx.AsyncClient
) -> None:
    # The real settings: connect 2 s, read 5 s, 3 attempts; nothing patched.
    assert lazyserve.sources.s3client.CONNECT_TIMEOUT == 2.0
    assert lazyserve.sources.s3client.READ_TIMEOUT == 5.0
    assert lazyserve.sources.s3client.ATTEMPTS == 3
    assert mod.service.model.wait == LOAD_WAIT
    front.mode = "stall"
    results: dict[str, httpx.Response] = {}
    health: list[httpx.Response] = []
    elapsed = 0.0

    async def predict() -> None:
        nonlocal elapsed
        started = time.perf_counter()
        results["predict"] = await client.post("/predict", json={"inputs": [DIGIT_8]})
        elapsed = time.perf_counter() - started

    async def ready() -> None:
        results["ready"] = await client.get("/ready")

    async with anyio.create_task_group() as group:
        group.start_soon(predict)
        with anyio.fail_after(10):
            while front.accepted == 0:
                await anyio.sleep(0.01)
        group.start_soon(ready)
        # The load is stalled; /health answers at once meanwhile.
        for _ in range(5):
            health.append(await client.get("/health"))

    assert elapsed < LOAD_WAIT < API_GATEWAY_TIMEOUT, elapsed
    response = results["predict"]
    assert_unavailable(
        response.status_code, response.headers, response.json(), BUCKET, KEY, "ReadTimeoutError"
    )
    assert "still loading" not in response.json()["detail"]["message"]
    ready_response = results["ready"]
    assert_unavailable(ready_response.status_code, ready_response.headers, ready_response.json())
    assert [r.status_code for r in health] == [200] * 5
    assert all(r.json() == {"status": "ok", "model": "loading"} for r in health)
    assert mod.service.model.loads_started == 1
    assert mod.service.model.peek() is None
    attempts = front.accepted

    front.mode = "relay"
    s3.clear()
    await assert_serves_again(client)
    assert weights_gets(s3) == PARTS
    # One load, ATTEMPTS connections that each waited READ_TIMEOUT.
    assert attempts == lazyserve.sources.s3client.ATTEMPTS, attempts
