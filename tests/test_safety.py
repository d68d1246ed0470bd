"""Safety: a pickle served from S3 never runs, other URI schemes are refused at import,
credentials never reach logs or answers, and the body size limit holds on every path.

tests/test_formats.py already refuses code-running pickles handed to the format layer; here the
same bytes come from S3 through the whole reference function."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import httpx
import pytest
import torch

import lazyserve.sources.s3
from lazyserve.errors import InvalidInput, ModelFormatError, ModelUnavailable, SettingsError
from lazyserve.sources import reset_s3_clients
from tests.helpers import (
    BUCKET,
    DIGIT_8,
    FAKE_CREDENTIALS,
    HTTP_EVENTS,
    KEY,
    MAX_BODY,
    REGION,
    ROOT,
    WEIGHTS,
    CredentialsEndpoint,
    ImportHandler,
    RunShell,
    TouchFile,
    asgi_client,
    assert_unloadable,
    body_of,
    event_with,
    header,
    is_weights_get,
    load_event,
    recheck_now,
    s3_uri,
    with_path,
)
from tests.s3server import CountingS3Server, WSGIApp

SESSION_TOKEN = "FAKE-SESSION-TOKEN-that-must-never-be-logged"
SECRETS = {
    "access key id": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
    "secret access key": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    "session token": SESSION_TOKEN,
}


# --- a pickle that would create a file, served from S3 --------------------------------------------


PAYLOADS: dict[str, tuple[type, str]] = {
    # name: (the object in the pickle, the global the refusal names)
    "Path.touch": (TouchFile, "GLOBAL getattr"),
    "os.system": (RunShell, "GLOBAL posix.system"),
}


def evil_bytes(payload: type, marker: Path) -> bytes:
    """A torch.save zip holding a state dict with one real tensor and one code-running object."""
    out = io.BytesIO()
    torch.save({"fc.weight": torch.ones(2), "x": payload(marker)}, out)
    return out.getvalue()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_evil_bytes_would_run_if_unpickled(tmp_path: Path, payload: str) -> None:
    # Guards the test below: loaded without weights_only, the very same bytes create the file.
    marker = tmp_path / "pwned"
    torch.load(io.BytesIO(evil_bytes(PAYLOADS[payload][0], marker)), weights_only=False)
    assert marker.exists()


@pytest.mark.anyio
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
@pytest.mark.parametrize("payload", PAYLOADS)
async def test_pickle_served_from_s3_is_refused_and_never_runs(
    s3: CountingS3Server, import_handler: ImportHandler, tmp_path: Path, payload: str, suffix: str
) -> None:
    kind, refused_global = PAYLOADS[payload]
    marker = tmp_path / "pwned"
    key = f"evil/model{suffix}"
    uploader = boto3.client("s3", region_name=REGION, endpoint_url=s3.endpoint)
    uploader.put_object(Bucket=BUCKET, Key=key, Body=evil_bytes(kind, marker))
    mod = import_handler(LAZYSERVE_MODEL_URI=f"s3://{BUCKET}/{key}")

    async with asgi_client(mod) as client:
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
        # The 500 names the object and the refusal in words.
        words = ["refused", refused_global] if suffix != ".safetensors" else ["zip archive"]
        assert_unloadable(
            response.status_code, response.headers, response.json(), BUCKET, key, *words
        )
        assert (await client.get("/health")).json() == {"status": "ok", "model": "failed"}
        assert (await client.get("/ready")).status_code == 500
    with pytest.raises(ModelFormatError):
        mod.handler(load_event("warmup"), None)
    with pytest.raises(ModelUnavailable):
        mod.handler(load_event("direct-predict"), None)
    assert mod.service.model.peek() is None
    # Refused once; the request, /ready, the warm-up and the invocation after it are answered
    # from memory: a file no retry changes is not downloaded again.
    assert mod.service.model.loads_started == 1
    assert not marker.exists()


# --- only s3://, file:// and plain paths ----------------------------------------------------------

REFUSED_URIS = [
    "https://lazyserve-models.s3.amazonaws.com/digits/digits.safetensors",
    "http://169.254.169.254/latest/meta-data/",
    "gs://bucket/digits.safetensors",
    "s3a://bucket/digits.safetensors",
    "s3n://bucket/digits.safetensors",
    "hf://org/digits",
    "az://container/digits.safetensors",
    "ftp://host/digits.safetensors",
    "smb://host/share/digits.safetensors",
    "data:application/octet-stream;base64,AAAA",
]


@pytest.mark.parametrize("uri", REFUSED_URIS)
def test_other_uri_schemes_are_refused_at_import(
    uri: str, import_handler: ImportHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[Any] = []
    monkeypatch.setattr(boto3.session.Session, "client", lambda *a, **k: created.append(a))
    scheme = uri.split(":", 1)[0]
    with pytest.raises(SettingsError) as info:
        import_handler(LAZYSERVE_MODEL_URI=uri, LAZYSERVE_LOAD="eager")
    message = str(info.value)
    assert message.startswith(f"LAZYSERVE_MODEL_URI has value '{uri}': scheme '{scheme}'")
    assert "s3://bucket/key" in message and "file:///abs/path" in message
    assert created == []  # refused before any AWS client, even with LAZYSERVE_LOAD=eager
    assert lazyserve.sources.s3._clients == {}


# --- credentials never reach logs or answers ------------------------------------------------------


def s3_auth_error(code: str) -> WSGIApp:
    """The 403 S3 sends for bad credentials: it echoes the access key id (and, for a signature
    mismatch, what it signed) in the XML body."""
    key_id = FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>The request signature we calculated does not match "
        f"the signature you provided.</Message><AWSAccessKeyId>{key_id}</AWSAccessKeyId>"
        f"<StringToSign>AWS4-HMAC-SHA256 {key_id}</StringToSign>"
        "<RequestId>LZSAFE-AUTH</RequestId><HostId>fake</HostId></Error>"
    ).encode()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(
            "403 Forbidden",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app


def leaks(text: str) -> list[str]:
    return [name for name, secret in SECRETS.items() if secret in text]


def record_text(record: logging.LogRecord) -> str:
    return "\n".join(
        str(part) for part in (record.getMessage(), record.exc_text, vars(record)) if part
    )


def http(mod: ModuleType, path: str, answers: list[str]) -> dict[str, Any]:
    """`path` through an HTTP API event (GET, or the stored POST for /predict); the whole
    Lambda response is kept in `answers`."""
    if path == "/predict":
        response: dict[str, Any] = mod.handler(load_event("http-api-predict"), None)
    else:
        response = mod.handler(with_path("http-api-health", path), None)
    answers.append(json.dumps(response))
    return response


@pytest.mark.parametrize("code", ["SignatureDoesNotMatch", "InvalidAccessKeyId"])
def test_credentials_never_reach_lazyserve_logs_or_answers(
    code: str,
    s3: CountingS3Server,
    import_handler: ImportHandler,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    caplog.set_level(logging.DEBUG)  # every logger, botocore's included
    mod = import_handler(LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_LOG_LEVEL="DEBUG")
    answers: list[str] = []

    failing = s3_auth_error(code)
    s3.fault = lambda request: failing if is_weights_get(request) else None
    response = http(mod, "/predict", answers)
    assert_unloadable(
        response["statusCode"],
        {k.lower(): v for k, v in response["headers"].items()},
        body_of(response),
        BUCKET,
        KEY,
        code,
    )
    assert http(mod, "/ready", answers)["statusCode"] == 500
    assert code in body_of(http(mod, "/model", answers))["last_error"]
    with pytest.raises(ModelUnavailable) as info:
        mod.handler(load_event("warmup"), None)
    answers.append(str(info.value))

    s3.fault = None
    recheck_now(mod.service.model)
    assert http(mod, "/predict", answers)["statusCode"] == 200
    http(mod, "/model", answers)
    answers.append(json.dumps(mod.handler(load_event("direct-predict"), None)))
    with pytest.raises(InvalidInput) as invalid:
        mod.handler(load_event("direct-invalid"), None)
    answers.append(str(invalid.value))

    assert mod.service.model.loads_succeeded == 1
    assert [leaks(answer) for answer in answers] == [[]] * len(answers)
    ours = [r for r in caplog.records if r.name.split(".")[0] == "lazyserve"]
    assert any(code in r.getMessage() for r in ours)  # the failure was logged ...
    assert [leaks(record_text(r)) for r in ours] == [[]] * len(ours)  # ... without credentials
    # No logger at all, botocore's DEBUG output included, ever sees the secret key.
    assert [r.name for r in caplog.records if SECRETS["secret access key"] in record_text(r)] == []


LAMBDA_SCRIPT = """
import sys, time
from handler.app import handler, service
try:
    print(handler({"warmup": True}, None)["warm"], flush=True)
except Exception as exc:
    print(type(exc).__name__, flush=True)
sys.stdin.readline()  # the test clears the fault, then lets us go on
service.model.recheck_every = 0.0  # look again at once: the failure was remembered
for _ in range(200):
    try:
        print(handler({"warmup": True}, None)["warm"], flush=True)
        break
    except Exception:
        time.sleep(0.05)
print(handler({"inputs": [[0] * 64]}, None)["predictions"][0]["label"] >= 0, flush=True)
"""


def test_lambda_process_output_at_debug_holds_no_credentials(
    s3: CountingS3Server, tmp_path: Path
) -> None:
    # What CloudWatch would get: a process shaped like Lambda (JSON log lines), lazyserve at
    # DEBUG, a load that fails on a credentials error, then one that succeeds.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAZYSERVE_")}
    env.update(
        AWS_SESSION_TOKEN=SESSION_TOKEN,
        AWS_LAMBDA_FUNCTION_NAME="lazyserve-test",
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_LOG_LEVEL="DEBUG",
        LAZYSERVE_METRICS="off",
    )
    failing = s3_auth_error("SignatureDoesNotMatch")
    s3.fault = lambda request: failing if is_weights_get(request) else None
    output = tmp_path / "lambda.log"
    with (
        output.open("wb") as out,
        subprocess.Popen(
            [sys.executable, "-c", LAMBDA_SCRIPT],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=out,
        ) as process,
    ):
        assert process.stdout is not None and process.stdin is not None
        try:
            logged: list[str] = []
            first = _printed(process.stdout, logged)
            s3.fault = None
            process.stdin.write(b"go\n")
            process.stdin.flush()
            lines = process.stdout.read().decode().splitlines()
            logged += [line for line in lines if line.startswith("{")]
            rest = [line.strip() for line in lines if not line.startswith("{")]
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
    log = output.read_text() + "\n".join(logged)
    assert first == "ModelFetchError"
    assert rest == ["True", "True"]
    assert "SignatureDoesNotMatch" in log  # the failure is in the log ...
    assert leaks(log) == []  # ... and no credential is


def _printed(stdout: Any, logged: list[str]) -> str:
    """The script's next printed line, past lazyserve's JSON log lines (stdout on Lambda), which
    go to `logged`."""
    while (line := stdout.readline().decode().strip()).startswith("{"):
        logged.append(line)
    return str(line)


# --- the body size limit, on every path -----------------------------------------------------------


@pytest.fixture
def local_mod(import_handler: ImportHandler) -> ModuleType:
    return import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))


@pytest.fixture
async def local_client(local_mod: ModuleType) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(local_mod) as client:
        yield client


def padded(size: int) -> bytes:
    body = json.dumps({"inputs": [DIGIT_8]}).encode()
    return body + b" " * (size - len(body))


def assert_413(status: int, content_type: str | None, content: bytes) -> None:
    assert status == 413, content[:200]
    assert content_type == "application/json"
    assert json.loads(content) == {"detail": f"the request body is larger than {MAX_BODY} bytes"}


@pytest.mark.anyio
async def test_streamed_body_without_content_length_over_6_mib_is_413(
    local_client: httpx.AsyncClient, local_mod: ModuleType
) -> None:
    # No Content-Length (chunked): the limit is found while the body streams in.
    async def stream() -> AsyncIterator[bytes]:
        body = padded(MAX_BODY + 1)
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    response = await local_client.post(
        "/predict", content=stream(), headers={"content-type": "application/json"}
    )
    assert_413(response.status_code, response.headers.get("content-type"), response.content)
    assert local_mod.service.model.loads_started == 0


@pytest.mark.parametrize("b64", [True, False], ids=["base64", "plain"])
@pytest.mark.parametrize("name", HTTP_EVENTS)
@pytest.mark.parametrize("size", [MAX_BODY, MAX_BODY + 1], ids=["6MiB", "6MiB+1"])
def test_event_body_limit(local_mod: ModuleType, name: str, b64: bool, size: int) -> None:
    response = local_mod.handler(event_with(name, padded(size), None, b64=b64), None)
    raw = response["body"]
    content = base64.b64decode(raw) if response.get("isBase64Encoded") else raw.encode()
    if size > MAX_BODY:
        assert_413(response["statusCode"], header(response, "content-type"), content)
    else:
        assert response["statusCode"] == 200, content[:200]
        assert body_of(response)["predictions"][0]["label"] == 8


def test_container_credentials_and_their_token_never_reach_logs_or_answers(
    s3: CountingS3Server,
    container: CredentialsEndpoint,
    import_handler: ImportHandler,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Credentials from the container endpoint (SnapStart, ECS): the endpoint's authorization
    # token and the credentials it hands out stay out of every message, at DEBUG.
    secrets = {
        "authorization token": "the-auth-token",
        "secret access key": str(container.document["SecretAccessKey"]),
        "session token": str(container.document["Token"]),
    }
    caplog.set_level(logging.DEBUG)
    mod = import_handler(LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_LOG_LEVEL="DEBUG")
    answers: list[str] = []
    failing = s3_auth_error("SignatureDoesNotMatch")
    s3.fault = lambda request: failing if is_weights_get(request) else None
    assert http(mod, "/predict", answers)["statusCode"] == 500
    # A restore from a snapshot renews the clients; the endpoint fails this time.
    reset_s3_clients()
    container.status = 500
    mod.service.model.forget()
    with pytest.raises(ModelUnavailable) as info:
        mod.handler(load_event("warmup"), None)
    answers.append(str(info.value))
    assert str(info.value) == (
        f"cannot read {s3_uri()}: botocore could not get credentials "
        "(CredentialRetrievalError from container-role)"
    )

    def leaked(text: str) -> list[str]:
        return [name for name, secret in secrets.items() if secret in text]

    assert [leaked(answer) for answer in answers] == [[]] * len(answers)
    assert [r.name for r in caplog.records if leaked(record_text(r))] == []
    assert container.seen == ["the-auth-token"] * 4  # sent to the endpoint, and only there
