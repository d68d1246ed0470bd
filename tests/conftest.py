from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType

import boto3
import pytest

from tests.helpers import (
    BUCKET,
    FAKE_CREDENTIALS,
    KEY,
    REGION,
    WEIGHTS,
    CredentialsEndpoint,
    Gate,
    expiring_in,
)
from tests.s3server import CountingS3Server


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
    from lazyserve.sources import reset_prefetches, reset_s3_clients

    for name in list(os.environ):
        if name.startswith(("LAZYSERVE_", "AWS_")):
            monkeypatch.delenv(name)
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    reset_s3_clients()
    yield
    reset_s3_clients()
    # A prefetch an eager import started and no load took must not serve a later test.
    reset_prefetches()


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


@pytest.fixture
def gate(s3: CountingS3Server) -> Iterator[Gate]:
    gate = Gate()
    s3.fault = gate
    try:
        yield gate
    finally:
        gate.open()
        s3.fault = None


@pytest.fixture
def container(monkeypatch: pytest.MonkeyPatch) -> Iterator[CredentialsEndpoint]:
    """A credentials endpoint named by AWS_CONTAINER_CREDENTIALS_FULL_URI, with a token, and no
    credentials in the environment (as under SnapStart)."""
    endpoint = CredentialsEndpoint(
        {
            "AccessKeyId": "ASIACONTAINERFAKE",
            "SecretAccessKey": "container/secret",
            "Token": "container-token",
            "Expiration": expiring_in(3600),
        }
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", endpoint.url)
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "the-auth-token")
    yield endpoint
    endpoint.stop()
