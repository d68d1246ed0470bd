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
    assert set(body) == {"detail"}
    assert set(body["detail"]) == {"error", "message"}
    assert body["detail"]["error"] == "model_unavailable"
    message = body["detail"]["message"]
    for word in must_name:
        assert word in message, (word, message)
    text = json.dumps(body)
    assert "Traceback" not in text
    assert 'File "' not in text
    assert FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in text
    assert FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"] not in text


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
    """`python -m uvicorn handler.app:app --fd N` on a socket the test bound to 127.0.0.1:0."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        host, port = self.sock.getsockname()
        self.url = f"http://{host}:{port}"
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "handler.app:app", "--fd", str(self.sock.fileno())],
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
                body = json.dumps(outer.document).encode()
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
