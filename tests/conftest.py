from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest

from tests.s3server import CountingS3Server, Request, WSGIApp

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
}


def load_event(name: str) -> dict[str, Any]:
    """A stored Lambda event from events/, by file name without `.json`."""
    data: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    return data


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def mangum_event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh current event loop per test, closed after it: Mangum adopts the current loop when
    an app module builds its handler, and one left open would leak into the next test."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield loop
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No LAZYSERVE_* or AWS_* variable leaks into a test; fake credentials, fixed region."""
    from lazyserve import sources
    from lazyserve.sources import reset_s3_clients

    for name in list(os.environ):
        if name.startswith(("LAZYSERVE_", "AWS_")):
            monkeypatch.delenv(name)
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    reset_s3_clients()
    yield
    reset_s3_clients()
    # A prefetch an eager import started and no load took must not serve a later test.
    sources._prefetches.clear()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[CountingS3Server]:
    """moto's S3 server on 127.0.0.1 (a free port), for the whole session."""
    server = CountingS3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: CountingS3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingS3Server]:
    """The S3 server, cleared, with boto3 pointed at it (AWS_ENDPOINT_URL_S3) and the reference
    weights uploaded to s3://BUCKET/KEY."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    client = boto3.client("s3", region_name=REGION, endpoint_url=s3_server.endpoint)
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    client.put_object(Bucket=BUCKET, Key=KEY, Body=WEIGHTS.read_bytes())
    s3_server.fault = None
    s3_server.clear()
    yield s3_server
    s3_server.fault = None


@pytest.fixture
def import_handler(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ModuleType]]:
    """Import handler.app afresh with the given LAZYSERVE_* settings, as a new process would."""

    def _import(**settings: str) -> ModuleType:
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        sys.modules.pop("handler.app", None)
        return importlib.import_module("handler.app")

    yield _import
    sys.modules.pop("handler.app", None)


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


@pytest.fixture
def gate(s3: CountingS3Server) -> Iterator[Gate]:
    gate = Gate()
    s3.fault = gate
    try:
        yield gate
    finally:
        gate.open()
        s3.fault = None


def s3_uri() -> str:
    return f"s3://{BUCKET}/{KEY}"
