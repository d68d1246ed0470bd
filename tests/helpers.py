"""Shared test helpers: the reference weights and events, S3 fault apps, assertions on the
contract's answers, and a uvicorn process on 127.0.0.1. Fixtures live in conftest.py."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import os
import pathlib
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

from handler.train import load_split
from tests.runtime_api import Call, Result, RuntimeAPI
from tests.s3server import CountingS3Server, Fault, Request, WSGIApp

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "events"
WEIGHTS = ROOT / "handler" / "weights" / "digits.safetensors"
REGION = "us-east-1"
BUCKET = "lazyserve-models"
KEY = "digits/digits.safetensors"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKEFAKE",
    "AWS_SECRET_ACCESS_KEY": "fake/secret/key/that/must/never/be/logged00",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    # botocore's chain reads no file of this machine's and never waits for instance metadata.
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
PART_SIZE = 16384
WEIGHTS_BYTES = WEIGHTS.read_bytes()
WEIGHTS_SHA256 = hashlib.sha256(WEIGHTS_BYTES).hexdigest()
# One load of the reference weights = this many ranged GETs at LAZYSERVE_S3_PART_SIZE=16384.
PARTS = math.ceil(len(WEIGHTS_BYTES) / PART_SIZE)
MAX_BODY = 6 * 1024 * 1024
DIGIT_8: list[int] = json.loads((EVENTS / "direct-predict.json").read_text())["inputs"][0]
ZEROS = [0] * 64
ImportHandler = Callable[..., ModuleType]


def load_event(name: str) -> dict[str, Any]:
    """A stored Lambda event from events/, by file name without `.json`."""
    data: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    return data


def is_weights_get(request: Request) -> bool:
    return request.method == "GET" and request.path == f"/{BUCKET}/{KEY}"


class Gate:
    """A fault that holds every GET of the weights object until `open()`: a stalled S3 that the
    test releases when it has seen what it wants (no timing involved)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.held = 0
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> WSGIApp | None:
        if is_weights_get(request):
            with self._lock:
                self.held += 1
            # Bounded so a failing test cannot hang the server thread forever.
            self._event.wait(60)
        return None

    def open(self) -> None:
        self._event.set()


def s3_uri() -> str:
    return f"s3://{BUCKET}/{KEY}"


def held_out_digits(count: int) -> tuple[list[list[float]], list[int]]:
    """`count` real digits from the split the reference model was NOT trained on."""
    _, x_test, _, y_test = load_split(seed=0)
    return x_test[:count].tolist(), y_test[:count].tolist()


def s3_error_app(
    status: int | str,
    code: str,
    message: str | None = None,
    *,
    request_id: str = "4442587FB7D0A2F9",
    **headers: str,
) -> WSGIApp:
    """A WSGI app answering like S3 does when it refuses a request: its XML error with the
    request id in the body and the `x-amz-request-id` header. `status` is 403 or "403 Forbidden";
    `headers` are added to the answer."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message or f'{code} (injected by the test)'}"
        f"</Message><RequestId>{request_id}</RequestId><HostId>fake-host-id</HostId></Error>"
    ).encode()
    reasons = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error", 503: "Slow Down"}
    line = status if isinstance(status, str) else f"{status} {reasons.get(status, 'Error')}"

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(
            line,
            [
                ("Content-Type", "application/xml"),
                ("Content-Length", str(len(body))),
                ("x-amz-request-id", request_id),
                *headers.items(),
            ],
        )
        return [body]

    return app


@contextmanager
def stalled_gets(s3: CountingS3Server) -> Iterator[None]:
    """Inside the block every GET to `s3` waits (up to 10 s) before it is answered; the waits end
    with the block."""
    release = threading.Event()

    def stall(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        release.wait(10)
        start_response("503 Slow Down", [("Content-Length", "0")])
        return [b""]

    s3.fault = lambda request: stall if request.method == "GET" else None
    try:
        yield
    finally:
        release.set()


def trickling_app(total: int, every: float = 0.3) -> WSGIApp:
    """A WSGI app that answers a ranged GET at once with S3's headers, then sends the body one
    byte every `every` seconds: never silent long enough for a read timeout."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        first, last = map(int, environ["HTTP_RANGE"].removeprefix("bytes=").split("-"))
        last = min(last, total - 1)
        start_response(
            "206 Partial Content",
            [
                ("Content-Range", f"bytes {first}-{last}/{total}"),
                ("Content-Length", str(last - first + 1)),
                ("ETag", '"trickle"'),
            ],
        )
        for _ in range(last - first + 1):
            yield b"\0"
            time.sleep(every)

    return app


def failing_gets(status: int, code: str, message: str) -> Fault:
    """A fault that answers every GET of the weights object with an S3 error."""
    app = s3_error_app(status, code, message)
    return lambda request: app if is_weights_get(request) else None


ACCESS_DENIED = (403, "AccessDenied", "Access Denied")
SLOW_DOWN = (503, "SlowDown", "Please reduce your request rate.")


def weights_gets(s3: CountingS3Server) -> int:
    return len(s3.object_gets(BUCKET, KEY))


def assert_prediction_shape(body: dict[str, Any], rows: int) -> None:
    assert set(body) == {"predictions", "model"}
    assert body["model"] == {"sha256": WEIGHTS_SHA256}
    assert len(body["predictions"]) == rows
    for prediction in body["predictions"]:
        assert isinstance(prediction["label"], int)
        probabilities = prediction["probabilities"]
        assert len(probabilities) == 10
        assert all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in probabilities)
        assert math.isclose(sum(probabilities), 1.0, abs_tol=1e-4)
        assert prediction["label"] == probabilities.index(max(probabilities))


def assert_unavailable(
    status: int, headers: Any, body: Any, *must_name: str, retry_after: str = "5"
) -> None:
    """The contract's 503: Retry-After, the cause in words, no traceback, no credentials."""
    assert status == 503, body
    assert headers.get("retry-after") == retry_after
    _assert_model_error(body, "model_unavailable", must_name)


def assert_unloadable(status: int, headers: Any, body: Any, *must_name: str) -> None:
    """A model that cannot load until its object (or the settings) change: 500 without
    Retry-After, the cause in words, no traceback, no credentials."""
    assert status == 500, body
    assert "retry-after" not in {k.lower() for k in headers}
    _assert_model_error(body, "model_unloadable", must_name)


def _assert_model_error(body: Any, error: str, must_name: tuple[str, ...]) -> None:
    """`{"detail": {"error": error, "message": ...}}` naming each of `must_name`, with no
    traceback and no credentials in it."""
    assert set(body) == {"detail"}
    assert set(body["detail"]) == {"error", "message"}
    assert body["detail"]["error"] == error
    message = body["detail"]["message"]
    for word in must_name:
        assert word in message, (word, message)
    text = json.dumps(body)
    assert "Traceback" not in text
    assert 'File "' not in text
    assert FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in text
    assert FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"] not in text


def recheck_now(holder: Any, timeout: float = 30.0) -> None:
    """Make a holder that remembers a failure look again at once (its recheck runs off the
    request path), and wait until it has looked: the next request then loads if the object
    changed."""
    holder.recheck_every = 0.0
    before = holder.rechecks
    holder.start()  # what a request does: finds the failure, starts the recheck
    deadline = time.monotonic() + timeout
    while holder.rechecks == before or (holder.failure is not None and _rechecking(holder)):
        assert time.monotonic() < deadline, "the recheck did not finish"
        time.sleep(0.01)


def _rechecking(holder: Any) -> bool:
    return bool(getattr(holder, "_rechecking", False))


def sqs_batch(*bodies: str, fifo_groups: list[str] | None = None) -> dict[str, Any]:
    """A batch made of the stored SQS event's record, one per body."""
    template = load_event("sqs-predict")["Records"][0]
    records = []
    for i, body in enumerate(bodies):
        record = copy.deepcopy(template)
        record["messageId"] = f"message-{i}"
        record["body"] = body
        if fifo_groups is not None:
            record["eventSourceARN"] += ".fifo"
            record["attributes"]["MessageGroupId"] = fifo_groups[i]
        records.append(record)
    return {"Records": records}


def failures(answer: dict[str, Any]) -> list[str]:
    """The message ids of an SQS partial batch response."""
    assert set(answer) == {"batchItemFailures"}
    return [item["itemIdentifier"] for item in answer["batchItemFailures"]]


def asgi_client(mod: ModuleType) -> httpx.AsyncClient:
    # raise_app_exceptions=False: see the response a user would get (e.g. a 500), not the error.
    transport = httpx.ASGITransport(app=mod.app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def header(response: dict[str, Any], name: str) -> str | None:
    """A response header, whichever of Mangum's response shapes carries it."""
    for key, value in (response.get("headers") or {}).items():
        if key.lower() == name:
            return str(value)
    for key, values in (response.get("multiValueHeaders") or {}).items():
        if key.lower() == name:
            return str(values[0])
    return None


def body_of(response: dict[str, Any]) -> Any:
    body = response["body"]
    if response.get("isBase64Encoded"):
        body = base64.b64decode(body)
    return json.loads(body)


def with_body(name: str, body: bytes, *, b64: bool = True) -> dict[str, Any]:
    """A copy of a stored HTTP event carrying another body."""
    event = copy.deepcopy(load_event(name))
    event["body"] = base64.b64encode(body).decode() if b64 else body.decode()
    event["isBase64Encoded"] = b64
    return event


def assert_label_8(response: dict[str, Any]) -> None:
    assert response["statusCode"] == 200, response
    assert header(response, "content-type") == "application/json"
    body = body_of(response)
    assert_prediction_shape(body, 1)
    assert body["predictions"][0]["label"] == 8


def with_path(name: str, path: str) -> dict[str, Any]:
    event = copy.deepcopy(load_event(name))
    event["rawPath"] = path
    event["requestContext"]["http"]["path"] = path
    return event


STARTUP_LIMIT = 30.0  # seconds uvicorn may take to import torch and answer /health


class UvicornProcess:
    """`python -m uvicorn APP --fd N` (the reference function's app unless told) on a socket
    the test bound to 127.0.0.1:0."""

    def __init__(self, env: dict[str, str], log: Path, app: str = "handler.app:app") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        host, port = self.sock.getsockname()
        self.url = f"http://{host}:{port}"
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--fd", str(self.sock.fileno())],
            pass_fds=(self.sock.fileno(),),
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_LIMIT
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(f"uvicorn exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        pytest.fail(f"uvicorn did not answer /health within {STARTUP_LIMIT}s:\n{self.log()}")

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
        finally:
            self._log.close()
            self.sock.close()


async def wait_until(condition: Callable[[], bool], limit: float = 30.0) -> None:
    with anyio.fail_after(limit):
        while not condition():
            await anyio.sleep(0.02)


HTTP_EVENTS = ["rest-predict", "http-api-predict", "alb-predict", "function-url-predict"]


def event_with(name: str, body: bytes, content_type: str | None, *, b64: bool) -> dict[str, Any]:
    """A stored HTTP event carrying `body` (base64 or plain) and, if given, a Content-Type."""
    event = copy.deepcopy(load_event(name))
    event["body"] = base64.b64encode(body).decode() if b64 else body.decode()
    event["isBase64Encoded"] = b64
    if content_type is not None:
        for key in ("headers", "multiValueHeaders"):
            headers = event.get(key)
            if isinstance(headers, dict):
                for existing in [k for k in headers if k.lower() == "content-type"]:
                    del headers[existing]
                headers["content-type"] = (
                    [content_type] if key == "multiValueHeaders" else (content_type)
                )
    return event


class TouchFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (self.marker,))


class RunShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


# -- a Lambda execution environment: awslambdaric on a test Runtime API --------------------

HANDLER = "handler.app.handler"


PYTHON = Path(sys.executable)


INIT_TIMEOUT = 60.0  # starting Python, importing torch and FastAPI


INVOKE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Dist:
    """What `python -m build` made: the sdist, the wheel built from it, and what build printed."""

    sdist: Path
    wheel: Path
    log: str


@dataclass(frozen=True)
class TaskImage:
    """What the container image holds: a Python whose site-packages has lazyserve installed
    from its wheel (its .pth start-up hook included), and the task root."""

    python: Path
    site: Path
    task: Path


def run_command(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def lambda_environ(
    image: TaskImage, runtime_api: str, s3_endpoint: str, home: Path, **overrides: str
) -> dict[str, str]:
    """The environment Lambda gives a container-image function (python3.13 base image),
    pointed at the test's Runtime API and S3; `overrides` add or replace variables."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "en_US.UTF-8",
        "TZ": ":UTC",
        "PYTHONPATH": str(image.task),
        "LAMBDA_TASK_ROOT": str(image.task),
        "LAMBDA_RUNTIME_DIR": "/var/runtime",
        "_HANDLER": HANDLER,
        "AWS_LAMBDA_RUNTIME_API": runtime_api,
        # As for the python3.13 base image; it makes awslambdaric poll /next from a thread.
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
        "AWS_LAMBDA_FUNCTION_NAME": "lazyserve-test",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3008",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/lazyserve-test",
        "AWS_LAMBDA_LOG_STREAM_NAME": "2026/01/01/[$LATEST]0123456789abcdef0123456789abcdef",
        **FAKE_CREDENTIALS,
        "AWS_SESSION_TOKEN": "fake-session-token",
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "LAZYSERVE_MODEL_URI": f"s3://{BUCKET}/{KEY}",
        "LAZYSERVE_S3_PART_SIZE": str(PART_SIZE),
    }
    env.update(overrides)
    return env


class LambdaFunction:
    """One execution environment: the awslambdaric process and the Runtime API it talks to."""

    def __init__(self, api: RuntimeAPI, env: dict[str, str], image: TaskImage, log: Path) -> None:
        self.api = api
        self.log_path = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [str(image.python), "-m", "awslambdaric", env["_HANDLER"]],
                cwd=image.task,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exited(self) -> str | None:
        """Why waiting is pointless (the process ended), else None."""
        code = self.process.poll()
        if code is None:
            return None
        return f"the function exited with code {code}; its output:\n{self.log()[-4000:]}"

    def invoke(self, event: Any, timeout: float = INVOKE_TIMEOUT) -> Result:
        request_id = self.api.invoke(event, timeout=timeout)
        return self.api.wait_result(request_id, timeout, abort=self.exited)

    def wait_call(self, method: str, suffix: str, timeout: float = INIT_TIMEOUT) -> Call:
        return self.api.wait_call(method, suffix, timeout, abort=self.exited)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


StartFunction = Callable[..., LambdaFunction]


def assert_prediction(payload: dict[str, Any]) -> None:
    (prediction,) = payload["predictions"]
    assert prediction["label"] == 8
    assert len(prediction["probabilities"]) == 10
    assert max(prediction["probabilities"]) == prediction["probabilities"][8]
    assert payload["model"]["sha256"] == WEIGHTS_SHA256


def http_body(result: Result) -> Any:
    """The JSON body of a 200 answer to an HTTP event (API Gateway, ALB, Function URL)."""
    assert result.kind == "response", result.body
    response = result.json()
    assert response["statusCode"] == 200, response
    assert not response.get("isBase64Encoded"), response
    return json.loads(response["body"])


def error_of(result: Result) -> dict[str, Any]:
    assert result.kind == "error", result.body
    error: dict[str, Any] = result.json()
    return error


# -- many models ------------------------------------------------------------------------------


def digits_variant(i: int) -> bytes:
    """The reference weights with the last layer's bias shifted by `i`/1000: a valid digits
    model of its own (its own sha256), which still classifies the digits."""
    from safetensors.torch import load, save

    state = load(WEIGHTS_BYTES)
    state["layers.4.bias"] = state["layers.4.bias"] + i / 1000
    return save(state)


_moto_clients: dict[str, Any] = {}


def moto_client(s3: CountingS3Server, service: str = "s3") -> Any:
    """A boto3 client for moto's server (cached: creating clients is slow), for seeding objects,
    roles and faults; lazyserve itself reads through its own GET client."""
    import boto3

    name = f"{s3.endpoint}/{service}"
    if name not in _moto_clients:
        _moto_clients[name] = boto3.client(service, region_name=REGION, endpoint_url=s3.endpoint)
    return _moto_clients[name]


def make_bucket(s3: CountingS3Server, name: str = BUCKET, *, versioned: bool = False) -> Any:
    """The bucket `name` on moto's server (made once), versioned if asked; its S3 client."""
    client = moto_client(s3)
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    if versioned:
        client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return client


def put_object(s3: CountingS3Server, key: str, body: bytes, **extra: Any) -> None:
    """Upload `body` to moto's S3 at BUCKET/key (as a user's `lazyserve push` or console would)."""
    moto_client(s3).put_object(Bucket=BUCKET, Key=key, Body=body, **extra)


def free_port() -> int:
    """A port nothing listens on now, for a command that takes `--port N` (the README's)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_serving(server: subprocess.Popen[Any], base: str, limit: float = 60.0) -> None:
    """Until `base`/health answers; fails at once if the server process exits."""
    deadline = time.monotonic() + limit
    while True:
        assert server.poll() is None, f"the server exited with {server.returncode}"
        try:
            httpx.get(f"{base}/health", timeout=1)
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)


@dataclass
class CredentialsEndpoint:
    """The container credentials endpoint (what ECS, SnapStart and EKS Pod Identity run), on
    127.0.0.1:0; answers `document` and records each request's Authorization header."""

    document: dict[str, Any]
    seen: list[str | None] = field(default_factory=list)
    status: int = 200

    def __post_init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.seen.append(self.headers.get("Authorization"))
                answer = outer.document if outer.status == 200 else {"message": "unavailable"}
                body = json.dumps(answer).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}/v2/credentials"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def expiring_in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- weights as views, and tiny transformers model directories (built offline) ---------------


def safetensors_views(state: dict[str, Any]) -> tuple[dict[str, Any], bytearray]:
    """`state` saved as safetensors bytes and read back as views over one bytearray, as a fetch
    gives them (the buffer is returned so a test can tell whether a tensor still lies in it)."""
    from safetensors.torch import save

    from lazyserve.formats import read_state_dict
    from lazyserve.sources import Weights

    buffer = bytearray(save(state))
    views = read_state_dict(Weights("memory.safetensors", len(buffer), "0" * 64, buffer=buffer))
    return views, buffer


def in_buffer(tensor: Any, buffer: bytearray) -> bool:
    """Whether the tensor's data lies inside `buffer` (a view, not a copy)."""
    import torch

    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    return bool(start <= tensor.data_ptr() < start + len(buffer))


def directory_views(directory: Path) -> tuple[dict[str, Any], list[bytearray]]:
    """The weights of a save_pretrained directory (one file or shards, safetensors or the
    legacy pytorch_model.bin) as tensors over one bytearray per file, merged into one state
    dict as a fetch of the directory would give."""
    from lazyserve.checkpoint import merge_shards, pretrained_files, read_shard_index
    from lazyserve.formats import read_state_dict
    from lazyserve.sources import Weights

    files = pretrained_files((p.name for p in directory.iterdir()), str(directory))
    index = None
    names = files.weights
    if files.index is not None:
        index = read_shard_index((directory / files.index).read_bytes(), files.index)
        names = index.files
    buffers = [bytearray((directory / name).read_bytes()) for name in names]
    shards = {
        # pytorch_model.bin files are torch.save state dicts, read through weights_only.
        name: read_state_dict(
            Weights(name, len(b), "0" * 64, buffer=b),
            format="pt" if name.endswith(".bin") else "safetensors",
        )
        for name, b in zip(names, buffers, strict=True)
    }
    return merge_shards(shards, str(directory), index), buffers


TINY_VOCAB = 96
TINY_TEXTS = ["the quick brown fox jumps over the lazy dog", "a lazy server serves models", "hello"]


def tiny_tokenizer(directory: Path) -> Any:
    """A WordPiece tokenizer trained offline on a few sentences (the `tokenizers` library), saved
    into `directory` with the transformers tokenizer's save_pretrained; returns it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=TINY_VOCAB, special_tokens=specials)
    tokenizer.train_from_iterator(TINY_TEXTS * 10, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,  # the models' positions: truncation=True then cuts longer texts
    )
    fast.save_pretrained(directory)
    return fast


def tiny_bert_classifier(directory: Path, *, tokenizer: bool = True, seed: int = 0) -> Path:
    """A 2-layer BertForSequenceClassification (hidden 32, 3 labels) with random weights, saved
    with save_pretrained (and a tokenizer) into `directory`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    if tokenizer:
        tiny_tokenizer(directory)
    return directory


def tiny_gpt2(directory: Path, *, max_shard_size: str | None = None, seed: int = 0) -> Path:
    """A 2-layer GPT2LMHeadModel (n_embd 32) with tied embeddings, saved with save_pretrained
    (lm_head.weight is left out of the file), sharded when `max_shard_size` is given."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=TINY_VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    if max_shard_size is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


# -- template.yaml: the stack CloudFormation would create, and its safe defaults -------------
# tests/test_template.py holds the reference template to these; tests/test_scaffold.py and
# tests/test_init.py hold the template `lazyserve init` writes to the same.

FUNCTION = "LazyserveFunction"
REQUIRED = {"ModelBucket": "models-bucket", "ModelKey": "digits/digits.safetensors"}
DIRECTORY_KEY = "sentiment/"
"""ModelKey for a template that serves save_pretrained directories (`lazyserve init
--huggingface`'s), whose ModelKey must end in "/"."""
PSEUDO = {
    "AWS::StackName": "digits-prod",
    "AWS::Region": "eu-west-1",
    "AWS::Partition": "aws",
    "AWS::AccountId": "123456789012",
    "AWS::URLSuffix": "amazonaws.com",
}
KMS_KEY = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:lazyserve-alarms"
ISSUER = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Example"
JWT = {"ApiAuth": "jwt", "JwtIssuer": ISSUER, "JwtAudience": "client-a,client-b"}


class _NoValue:
    def __repr__(self) -> str:
        return "AWS::NoValue"


NO_VALUE = _NoValue()


class Stack:
    """template.yaml as CloudFormation would deploy it for these parameter values (given as
    strings, as CloudFormation receives them; unset ones take their defaults). Resources are
    not created, so `Ref` to one reads `<Id>` and `Fn::GetAtt` reads `<Id.Attribute>`."""

    def __init__(self, template: dict[str, Any], **overrides: str) -> None:
        declared = template["Parameters"]
        assert overrides.keys() <= declared.keys(), overrides.keys() - declared.keys()
        self.template = template
        self.params = {name: str(p["Default"]) for name, p in declared.items() if "Default" in p}
        self.params |= required(template) | overrides
        assert self.params.keys() == declared.keys(), declared.keys() - self.params.keys()
        for name, value in self.params.items():
            problem = parameter_problem(declared[name], value)
            assert problem is None, f"{name}={value!r}: {problem}"
        self._conditions: dict[str, bool] = {}

    def condition(self, name: str) -> bool:
        if name not in self._conditions:
            value = self.resolve(self.template["Conditions"][name])
            assert isinstance(value, bool), (name, value)
            self._conditions[name] = value
        return self._conditions[name]

    def creates(self, logical_id: str) -> bool:
        resource = self.template["Resources"][logical_id]
        return "Condition" not in resource or self.condition(resource["Condition"])

    @property
    def resources(self) -> dict[str, dict[str, Any]]:
        """The resources this stack creates, their properties resolved."""
        return {
            logical_id: {
                "Type": resource["Type"],
                "Properties": self.resolve(resource.get("Properties", {})),
            }
            for logical_id, resource in self.template["Resources"].items()
            if self.creates(logical_id)
        }

    def of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        return {
            logical_id: resource["Properties"]
            for logical_id, resource in self.resources.items()
            if resource["Type"] == kind
        }

    @property
    def function(self) -> dict[str, Any]:
        return self.resources[FUNCTION]["Properties"]

    @property
    def environment(self) -> dict[str, str]:
        variables: dict[str, str] = self.function["Environment"]["Variables"]
        return variables

    def rule_failures(self) -> list[str]:
        """The AssertDescription of each rule assertion these parameter values break."""
        failures = []
        for rule in self.template.get("Rules", {}).values():
            if "RuleCondition" in rule and not self.resolve(rule["RuleCondition"]):
                continue
            for assertion in rule["Assertions"]:
                if not self.resolve(assertion["Assert"]):
                    failures.append(assertion["AssertDescription"])
        return failures

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [item for item in map(self.resolve, value) if item is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self._ref(arg)
            if key == "Condition":
                return self.condition(arg)
            if key.startswith("Fn::"):
                return self._function(key, arg)
        resolved = {key: self.resolve(item) for key, item in value.items()}
        return {key: item for key, item in resolved.items() if item is not NO_VALUE}

    def _ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in PSEUDO:
            return PSEUDO[name]
        if name in self.params:
            return self.params[name]
        assert self.creates(name), f"Ref to {name}, which this stack does not create"
        return f"<{name}>"

    def _attribute(self, name: str, attribute: str) -> str:
        assert self.creates(name), f"GetAtt of {name}, which this stack does not create"
        return f"<{name}.{attribute}>"

    def _sub(self, match: re.Match[str]) -> str:
        name = match.group(1)
        if "." in name and not name.startswith("AWS::"):
            return self._attribute(*name.split(".", 1))
        return str(self._ref(name))

    def _function(self, key: str, arg: Any) -> Any:
        if key == "Fn::If":
            name, then, otherwise = arg
            return self.resolve(then if self.condition(name) else otherwise)
        if key == "Fn::Equals":
            left, right = (str(self.resolve(item)) for item in arg)
            return left == right
        if key == "Fn::Not":
            return not self.resolve(arg[0])
        if key == "Fn::And":
            return all(self.resolve(item) for item in arg)
        if key == "Fn::Or":
            return any(self.resolve(item) for item in arg)
        if key == "Fn::Sub":
            assert isinstance(arg, str), "Fn::Sub with a variable map"
            return re.sub(r"\$\{([^!}][^}]*)\}", self._sub, arg)
        if key == "Fn::Join":
            separator, items = arg
            return separator.join(self.resolve(items))
        if key == "Fn::Split":
            separator, text = arg
            return str(self.resolve(text)).split(separator)
        if key == "Fn::Select":
            index, items = arg
            return self.resolve(items)[int(self.resolve(index))]
        if key == "Fn::GetAtt":
            name, attribute = arg.split(".", 1) if isinstance(arg, str) else arg
            return self._attribute(name, attribute)
        raise AssertionError(f"the resolver does not know {key}")


def required(template: dict[str, Any]) -> dict[str, str]:
    """Values for the parameters without a default: REQUIRED, with DIRECTORY_KEY as ModelKey
    where the template refuses a key of one object."""
    if parameter_problem(template["Parameters"]["ModelKey"], REQUIRED["ModelKey"]) is None:
        return REQUIRED
    return REQUIRED | {"ModelKey": DIRECTORY_KEY}


def parameter_problem(declared: dict[str, Any], value: str) -> str | None:
    """What CloudFormation would refuse about a parameter value, or None. (CloudFormation
    matches AllowedPattern with Java regular expressions; the patterns here use only syntax
    that Java and Python read alike.)"""
    if "AllowedValues" in declared and value not in map(str, declared["AllowedValues"]):
        return f"not one of {declared['AllowedValues']}"
    if "AllowedPattern" in declared and not re.fullmatch(declared["AllowedPattern"], value):
        return f"does not match {declared['AllowedPattern']}"
    if not declared.get("MinLength", 0) <= len(value) <= declared.get("MaxLength", 4096):
        return "wrong length"
    if declared["Type"] == "Number":
        number = float(value)
        if number < declared.get("MinValue", number) or number > declared.get("MaxValue", number):
            return "out of range"
    return None


def load_template(path: Path) -> dict[str, Any]:
    """A SAM template as cfn-lint reads it (short-form tags such as !Ref resolved)."""
    from cfnlint.decode import decode  # type: ignore[import-untyped]

    decoded, problems = decode(str(path))
    assert not problems, [str(p) for p in problems]
    assert isinstance(decoded, dict)
    return decoded


def cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    """cfn-lint (this venv's) run on a template."""
    command = [str(PYTHON.parent / "cfn-lint"), str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def statements(stack: Stack) -> list[dict[str, Any]]:
    """Every IAM statement this stack grants to its function."""
    function = stack.function
    # SAM's Policies would bring AWSLambdaBasicExecutionRole (logs on "*"); the role is ours.
    assert "Policies" not in function and function["Role"] == "<FunctionRole.Arn>"
    found: list[dict[str, Any]] = []
    for logical_id, role in stack.of_type("AWS::IAM::Role").items():
        assert "ManagedPolicyArns" not in role, logical_id
        assert role["AssumeRolePolicyDocument"]["Statement"] == [
            {
                "Effect": "Allow",
                "Principal": {"Service": "lambda.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ]
        for policy in role["Policies"]:
            found.extend(policy["PolicyDocument"]["Statement"])
    assert not stack.of_type("AWS::IAM::Policy") and not stack.of_type("AWS::IAM::ManagedPolicy")
    return found


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def grants(stack: Stack) -> dict[str, tuple[list[str], list[str]]]:
    """Sid -> (actions, resources), after checking nothing is granted on `*` or by negation."""
    found = {}
    for statement in statements(stack):
        assert statement["Effect"] == "Allow"
        assert not {"NotAction", "NotResource", "NotPrincipal"} & statement.keys(), statement
        actions, resources = as_list(statement["Action"]), as_list(statement["Resource"])
        for action in actions:
            assert "*" not in action, f"{statement['Sid']}: wildcard action {action}"
        for resource in resources:
            # A trailing * below a fixed prefix (a key prefix, a log group's streams) only.
            assert "*" not in resource[:-1], resource
            assert not resource.endswith("*") or resource[-2] in "/:", resource
            assert resource.startswith("arn:aws:"), resource
        found[statement["Sid"]] = (sorted(actions), resources)
    return found


def routes(stack: Stack) -> dict[str, dict[str, Any]]:
    """RouteKey -> route, after checking each one reaches the function through this API."""
    found = {}
    for route in stack.of_type("AWS::ApiGatewayV2::Route").values():
        assert route["ApiId"] == "<HttpApi>"
        assert route["Target"] == "integrations/<HttpApiIntegration>"
        found[route["RouteKey"]] = route
    return found


LOGS = (
    ["logs:CreateLogStream", "logs:PutLogEvents"],
    ["arn:aws:logs:eu-west-1:123456789012:log-group:<FunctionLogGroup>:*"],
)
S3_READ = ["s3:GetObject", "s3:GetObjectVersion"]


def alarms(stack: Stack) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (alarm["Namespace"], alarm["MetricName"]): alarm
        for alarm in stack.of_type("AWS::CloudWatch::Alarm").values()
    }


def check_signed_requests_only(template: dict[str, Any]) -> None:
    """By default every route takes only SigV4-signed (IAM) requests; the Function URL always."""
    defaults = Stack(template)
    assert template["Parameters"]["ApiAuth"]["Default"] == "iam"
    for key, route in routes(defaults).items():
        assert route["AuthorizationType"] == "AWS_IAM", key
        assert "AuthorizerId" not in route, key
    assert not defaults.of_type("AWS::ApiGatewayV2::Authorizer")
    # The Function URL, the other way in, takes signed requests only too.
    assert defaults.function["FunctionUrlConfig"] == {"AuthType": "AWS_IAM"}


def check_only_none_opens_the_api(template: dict[str, Any]) -> None:
    """Only ApiAuth=none lets unsigned requests through, and never to the Function URL."""
    for mode in template["Parameters"]["ApiAuth"]["AllowedValues"]:
        stack = Stack(template, **(JWT | {"ApiAuth": mode}))
        types = {route["AuthorizationType"] for route in routes(stack).values()}
        assert types == {"NONE"} if mode == "none" else "NONE" not in types
        # Whatever the API does, the Function URL keeps requiring signatures.
        assert stack.function["FunctionUrlConfig"] == {"AuthType": "AWS_IAM"}
    stack = Stack(template, ApiAuth="none", JwtIssuer=ISSUER)
    assert not stack.of_type("AWS::ApiGatewayV2::Authorizer")
    assert stack.rule_failures() == []


def check_bounded_rate_and_concurrency(template: dict[str, Any]) -> None:
    """The API is throttled (10 per second, bursts of 20) and 10 environments are reserved."""
    defaults = Stack(template)
    (stage,) = defaults.of_type("AWS::ApiGatewayV2::Stage").values()
    # The $default stage, deployed on every change, so the routes are live and throttled.
    assert (stage["ApiId"], stage["StageName"], stage["AutoDeploy"]) == (
        "<HttpApi>",
        "$default",
        True,
    )
    assert stage["DefaultRouteSettings"] == {
        "ThrottlingRateLimit": "10",
        "ThrottlingBurstLimit": "20",
    }
    assert defaults.function["ReservedConcurrentExecutions"] == "10"


def check_json_logs_with_retention(template: dict[str, Any]) -> None:
    """JSON log lines at ApplicationLogLevel, in a log group of the stack's that expires them."""
    defaults = Stack(template)
    assert defaults.function["LoggingConfig"] == {
        "LogFormat": "JSON",
        "ApplicationLogLevel": "INFO",
        "LogGroup": "<FunctionLogGroup>",
    }
    assert defaults.of_type("AWS::Logs::LogGroup") == {
        "FunctionLogGroup": {"RetentionInDays": "30"}
    }
    stack = Stack(template, ApplicationLogLevel="DEBUG", LogRetentionDays="365")
    assert stack.function["LoggingConfig"]["ApplicationLogLevel"] == "DEBUG"
    assert stack.of_type("AWS::Logs::LogGroup")["FunctionLogGroup"]["RetentionInDays"] == "365"


def check_role_reads_only_the_model(template: dict[str, Any]) -> None:
    """The role may read the model object (any version) and write its own logs, nothing else."""
    model = f"arn:aws:s3:::{REQUIRED['ModelBucket']}/{REQUIRED['ModelKey']}"
    assert grants(Stack(template)) == {
        "WriteOwnLogs": LOGS,
        "ReadModelWeights": (S3_READ, [model]),
    }


def check_prefix_reads_below_it(template: dict[str, Any]) -> None:
    """A key prefix (many models) grants reading, and listing, below that prefix only."""
    stack = Stack(template, ModelKey="models/")
    assert grants(stack)["ReadModelWeights"] == (S3_READ, ["arn:aws:s3:::models-bucket/models/*"])
    # Listing under the prefix only: a missing model is then NoSuchKey (a 404), not
    # AccessDenied.
    (listing,) = [s for s in statements(stack) if s.get("Sid") == "ListModelPrefix"]
    assert as_list(listing["Action"]) == ["s3:ListBucket"]
    assert as_list(listing["Resource"]) == ["arn:aws:s3:::models-bucket"]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": "models/*"}}


def check_role_reads_only_the_directory(template: dict[str, Any]) -> None:
    """A template of save_pretrained directories: the role may list and read below ModelKey
    (one directory, or a prefix of many) and write its own logs, nothing else; a key of one
    object is refused, since the role could not list a directory there."""
    bucket = REQUIRED["ModelBucket"]
    for key in (DIRECTORY_KEY, "models/"):
        stack = Stack(template, ModelKey=key)
        assert stack.environment["LAZYSERVE_MODEL_URI"] == f"s3://{bucket}/{key}"
        assert grants(stack) == {
            "WriteOwnLogs": LOGS,
            "ReadModelWeights": (["s3:GetObject"], [f"arn:aws:s3:::{bucket}/{key}*"]),
            "ListModelPrefix": (["s3:ListBucket"], [f"arn:aws:s3:::{bucket}"]),
        }
        (listing,) = [s for s in statements(stack) if s.get("Sid") == "ListModelPrefix"]
        assert listing["Condition"] == {"StringLike": {"s3:prefix": f"{key}*"}}
    declared = template["Parameters"]["ModelKey"]
    for key in ("sentiment", REQUIRED["ModelKey"], "/", "a*/", "sentiment/${aws:username}/"):
        assert parameter_problem(declared, key) is not None, key


def check_no_kms_without_a_key(template: dict[str, Any]) -> None:
    """No KMS permission unless ModelKmsKeyArn names a key."""
    assert not [s for s in statements(Stack(template)) if "kms" in json.dumps(s).lower()]


def check_kms_key_adds_decrypt_through_s3(template: dict[str, Any]) -> None:
    """ModelKmsKeyArn adds kms:Decrypt on that key, through S3 in the stack's region only."""
    stack = Stack(template, ModelKmsKeyArn=KMS_KEY)
    (kms,) = [s for s in statements(stack) if "kms" in json.dumps(s).lower()]
    assert as_list(kms["Action"]) == ["kms:Decrypt"]
    assert as_list(kms["Resource"]) == [KMS_KEY]
    assert kms["Condition"] == {"StringEquals": {"kms:ViaService": "s3.eu-west-1.amazonaws.com"}}
    assert grants(stack)["ReadModelWeights"] == grants(Stack(template))["ReadModelWeights"]
    # An alias is not a key: IAM would not match it against the key S3 uses.
    alias = "arn:aws:kms:eu-west-1:123456789012:alias/models"
    assert parameter_problem(template["Parameters"]["ModelKmsKeyArn"], alias) is not None


def check_alarms(template: dict[str, Any]) -> None:
    """Alarms on the function's errors and throttles and on lazyserve's model load time."""
    from lazyserve.metrics import NAMESPACE

    defaults = Stack(template)
    found = alarms(defaults)
    assert set(found) == {
        ("AWS/Lambda", "Errors"),
        ("AWS/Lambda", "Throttles"),
        (NAMESPACE, "ModelLoadSeconds"),
    }
    function = [{"Name": "FunctionName", "Value": f"<{FUNCTION}>"}]
    assert found["AWS/Lambda", "Errors"]["Dimensions"] == function
    assert found["AWS/Lambda", "Throttles"]["Dimensions"] == function
    load = found[NAMESPACE, "ModelLoadSeconds"]
    # lazyserve's metrics carry one dimension, service, valued POWERTOOLS_SERVICE_NAME.
    service = defaults.environment["POWERTOOLS_SERVICE_NAME"]
    assert service == PSEUDO["AWS::StackName"]
    assert load["Dimensions"] == [{"Name": "service", "Value": service}]
    assert (load["Statistic"], load["Threshold"], load["ComparisonOperator"]) == (
        "Maximum",
        "20",
        "GreaterThanThreshold",
    )
    for alarm in found.values():
        # Quiet periods (no invocation, no load) are not alarms; no topic, no notifications.
        assert alarm["TreatMissingData"] == "notBreaching"
        assert "AlarmActions" not in alarm and "OKActions" not in alarm


def check_alarms_notify_a_topic_or_none(template: dict[str, Any]) -> None:
    """AlarmTopicArn makes every alarm notify it; Alarms=disabled removes them all."""
    for alarm in alarms(Stack(template, AlarmTopicArn=TOPIC)).values():
        assert (alarm["AlarmActions"], alarm["OKActions"]) == ([TOPIC], [TOPIC])
    assert alarms(Stack(template, Alarms="disabled", AlarmTopicArn=TOPIC)) == {}


SAFE_DEFAULTS = (
    check_signed_requests_only,
    check_only_none_opens_the_api,
    check_bounded_rate_and_concurrency,
    check_json_logs_with_retention,
    check_role_reads_only_the_model,
    check_prefix_reads_below_it,
    check_no_kms_without_a_key,
    check_kms_key_adds_decrypt_through_s3,
    check_alarms,
    check_alarms_notify_a_topic_or_none,
)
"""Every safe-default check, each taking the decoded template."""

DIRECTORY_SAFE_DEFAULTS = tuple(
    check_role_reads_only_the_directory if check is check_role_reads_only_the_model else check
    for check in SAFE_DEFAULTS
    if check is not check_prefix_reads_below_it
)
"""The same checks for a template of save_pretrained directories, whose ModelKey is always a
prefix (check_role_reads_only_the_directory covers both of the prefix checks)."""


# -- Dockerfile ---------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """A Dockerfile's (INSTRUCTION, arguments) pairs, continuation lines joined, comments
    dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        found.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


def copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """Each COPY or ADD of a Dockerfile: (sources, destination)."""
    found = []
    for keyword, args in instructions(dockerfile):
        if keyword in ("COPY", "ADD"):
            *sources, destination = [w for w in shlex.split(args) if not w.startswith("--")]
            found.append((sources, destination))
    return found


def check_task_root_readable(dockerfile: Path) -> None:
    """After the last COPY into the task root, a RUN makes all of it world-readable: Lambda runs
    the function as a non-root user, and COPY keeps a file's mode (0600 under umask 077)."""
    steps = instructions(dockerfile)
    copied = [
        i
        for i, (keyword, args) in enumerate(steps)
        if keyword in ("COPY", "ADD") and "${LAMBDA_TASK_ROOT}" in args
    ]
    chmods = [
        i for i, step in enumerate(steps) if step == ("RUN", "chmod -R a+rX ${LAMBDA_TASK_ROOT}")
    ]
    assert copied and chmods and chmods[-1] > copied[-1], steps


# -- `lazyserve serve` as a user runs it ----------------------------------------------------

LAZYSERVE = Path(sys.executable).parent / "lazyserve"


class Console:
    """The lines a process writes to stdout and stderr, read in threads as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.seen: list[tuple[str, str]] = []
        self.threads = [
            threading.Thread(target=self._pump, args=(name, getattr(process, name)), daemon=True)
            for name in ("stdout", "stderr")
        ]
        for thread in self.threads:
            thread.start()

    def _pump(self, name: str, stream: Any) -> None:
        for line in stream:
            self.lines.put((name, line.rstrip("\n")))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                name, line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                assert self.process.poll() is None, f"exited: {self.seen}"
                continue
            self.seen.append((name, line))
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matched {pattern!r} in {timeout}s: {self.seen}")

    def rest(self) -> None:
        """Collect what is left once the process has ended."""
        self.process.wait(timeout=30)
        for thread in self.threads:
            thread.join(timeout=10)  # they end at the end of their pipe
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def serving(*args: str, cwd: Path = ROOT, **env: str) -> Iterator[tuple[str, Console]]:
    """`lazyserve serve ARGS --host 127.0.0.1 --port 0` from `cwd` (the repository and any
    PYTHONPATH importable too): yields its URL and console; Ctrl-C at the end."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [str(LAZYSERVE), "serve", *args, "--host", "127.0.0.1", "--port", "0"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    console = Console(process)
    try:
        running = console.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+) ", 180)
        yield f"http://127.0.0.1:{running[1]}", console
    finally:
        process.send_signal(signal.SIGINT)
        try:
            console.rest()
        except subprocess.TimeoutExpired:
            process.kill()
            console.rest()
