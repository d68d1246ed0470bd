"""End to end: the reference function under a real uvicorn process on 127.0.0.1, loading from
moto's S3 server over real HTTP, driven by real HTTP clients."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.helpers import (
    BUCKET,
    DIGIT_8,
    KEY,
    PART_SIZE,
    PARTS,
    SLOW_DOWN,
    WEIGHTS_SHA256,
    Gate,
    UvicornProcess,
    assert_prediction_shape,
    assert_unavailable,
    failing_gets,
    s3_uri,
    wait_until,
    weights_gets,
)
from tests.s3server import CountingS3Server

CLIENTS = 40

StartServer = Callable[..., str]


@pytest.fixture
def start_server(s3: CountingS3Server, tmp_path: Path) -> Iterator[StartServer]:
    """Start the reference function under uvicorn, loading s3://lazyserve-models/digits/...
    from the moto server; returns its base URL. Every server is stopped after the test."""
    servers: list[UvicornProcess] = []

    def start(**settings: str) -> str:
        env = dict(os.environ)  # fake credentials, region and AWS_ENDPOINT_URL_S3 (s3 fixture)
        env.update(
            LAZYSERVE_MODEL_URI=s3_uri(),
            LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),
            LAZYSERVE_LOG_LEVEL="WARNING",
        )
        env.update(settings)
        assert env["AWS_ENDPOINT_URL_S3"] == s3.endpoint
        server = UvicornProcess(env, tmp_path / f"uvicorn-{len(servers)}.log")
        servers.append(server)
        server.wait_healthy()
        return server.url

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.mark.anyio
async def test_concurrent_clients_during_cold_start_share_one_load(
    s3: CountingS3Server, start_server: StartServer, gate: Gate
) -> None:
    url = start_server()
    async with httpx.AsyncClient(base_url=url, timeout=60) as probe:
        assert (await probe.get("/health")).json() == {"status": "ok", "model": "not_loaded"}
    assert weights_gets(s3) == 0

    statuses: list[int] = []
    labels: list[int] = []
    sent = 0

    async def client() -> None:
        nonlocal sent
        # One connection per client: 40 separate users arriving at a cold process.
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            sent += 1
            response = await http.post("/predict", json={"inputs": [DIGIT_8]})
        statuses.append(response.status_code)
        if response.status_code == 200:
            body = response.json()
            assert_prediction_shape(body, 1)
            labels.append(body["predictions"][0]["label"])

    async with anyio.create_task_group() as group:
        for _ in range(CLIENTS):
            group.start_soon(client)
        # Hold S3 until the load has begun and every client has sent its request, so the
        # requests really arrive during the cold start; then let the load finish.
        await wait_until(lambda: gate.held >= 1 and sent == CLIENTS)
        await anyio.sleep(0.2)
        gate.open()

    assert statuses == [200] * CLIENTS
    assert labels == [8] * CLIENTS
    assert weights_gets(s3) == PARTS
    async with httpx.AsyncClient(base_url=url, timeout=60) as probe:
        meta = (await probe.get("/model")).json()
    assert meta["loads"] == 1
    assert meta["load_attempts"] == 1
    assert meta["sha256"] == WEIGHTS_SHA256


@pytest.mark.anyio
async def test_health_answers_loading_while_s3_is_slow(
    s3: CountingS3Server, start_server: StartServer, gate: Gate
) -> None:
    url = start_server()
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def predict() -> None:
            response = await http.post("/predict", json={"inputs": [DIGIT_8]})
            statuses.append(response.status_code)

        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(predict)
            await wait_until(lambda: gate.held >= 1)
            # S3 is stalled: the predictions wait, /health and /model answer meanwhile.
            for _ in range(5):
                response = await http.get("/health")
                assert response.status_code == 200
                assert response.json() == {"status": "ok", "model": "loading"}
            assert (await http.get("/model")).json()["status"] == "loading"
            assert statuses == []  # the predictions are still waiting for the load
            gate.open()

        assert statuses == [200] * 5
        assert (await http.get("/health")).json() == {"status": "ok", "model": "loaded"}
    assert weights_gets(s3) == PARTS


@pytest.mark.anyio
async def test_load_outlasting_load_wait_is_503_then_served_by_the_same_load(
    s3: CountingS3Server, start_server: StartServer, gate: Gate
) -> None:
    url = start_server(LAZYSERVE_LOAD_WAIT="0.5")
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        response = await http.post("/predict", json={"inputs": [DIGIT_8]})
        assert_unavailable(
            response.status_code, response.headers, response.json(), "loading", retry_after="2"
        )
        gate.open()
        response = await http.get("/ready")
        assert response.status_code == 200
        response = await http.post("/predict", json={"inputs": [DIGIT_8]})
        assert response.status_code == 200
        meta = (await http.get("/model")).json()
    assert meta["load_attempts"] == 1
    assert weights_gets(s3) == PARTS


@pytest.mark.anyio
async def test_failing_s3_is_503_then_a_later_request_loads(
    s3: CountingS3Server, start_server: StartServer
) -> None:
    url = start_server()
    s3.fault = failing_gets(*SLOW_DOWN)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for _ in range(2):
            response = await http.post("/predict", json={"inputs": [DIGIT_8]})
            assert response.headers["content-type"] == "application/json"
            assert_unavailable(
                response.status_code, response.headers, response.json(), BUCKET, KEY,
                "SlowDown",
            )  # fmt: skip
        assert (await http.get("/health")).json() == {"status": "ok", "model": "failed"}

        s3.fault = None
        s3.clear()
        response = await http.post("/predict", json={"inputs": [DIGIT_8]})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == 8
        meta = (await http.get("/model")).json()
    assert meta["loads"] == 1
    assert meta["load_attempts"] == 3
    assert weights_gets(s3) == PARTS


@pytest.mark.anyio
async def test_errors_over_real_http_are_json(start_server: StartServer) -> None:
    url = start_server()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        response = await http.post(
            "/predict", content=b'{"inputs": [[1, 2', headers={"content-type": "application/json"}
        )
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"][0] == "body"

        body = json.dumps({"inputs": [DIGIT_8]}).encode()
        response = await http.post(
            "/predict",
            content=body + b" " * (6 * 1024 * 1024 + 1 - len(body)),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/json"
        assert "detail" in response.json()
