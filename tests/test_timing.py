"""The `Server-Timing` header a browser's network panel shows: `load;dur=` when the request waited
for the model to load, `infer;dur=` when it ran the model, `app;dur=` always; on every status the
app answers, in-process (ASGI) and through Mangum; and the same figures in `GET /model`."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import AsyncIterator
from types import ModuleType

import anyio
import httpx
import pytest

from lazyserve import timing
from lazyserve.cli import FakeContext
from lazyserve.lazy import LazyModel
from tests.helpers import (
    DIGIT_8,
    MAX_BODY,
    PART_SIZE,
    SLOW_DOWN,
    WEIGHTS,
    Gate,
    ImportHandler,
    asgi_client,
    failing_gets,
    header,
    load_event,
    s3_uri,
)
from tests.s3server import CountingS3Server

ENTRY = re.compile(r"(?P<name>[A-Za-z0-9_-]+);dur=(?P<dur>[0-9.]+)")


def server_timing(value: str | None) -> dict[str, float]:
    """`load;dur=1.5, infer;dur=0.2, app;dur=2.0` -> {name: ms}, in order, each name once."""
    assert value, "no Server-Timing header"
    entries: dict[str, float] = {}
    for part in value.split(", "):
        match = ENTRY.fullmatch(part)
        assert match, (part, value)
        assert match["name"] not in entries, value
        dur = float(match["dur"])
        assert math.isfinite(dur) and dur >= 0, value
        entries[match["name"]] = dur
    assert list(entries)[-1] == "app", value
    return entries


def assert_app_covers_the_rest(timings: dict[str, float]) -> None:
    # `app` spans the whole request; load and infer happen inside it, one after the other.
    assert timings["app"] + 0.01 >= sum(ms for name, ms in timings.items() if name != "app")


@pytest.fixture
async def client(import_handler: ImportHandler) -> AsyncIterator[httpx.AsyncClient]:
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    async with asgi_client(mod) as client:
        yield client


@pytest.fixture
def s3_mod(s3: CountingS3Server, import_handler: ImportHandler) -> ModuleType:
    return import_handler(LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_S3_PART_SIZE=str(PART_SIZE))


# --- /predict -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_predict_shows_load_on_the_cold_request_and_infer_on_every_one(
    s3_mod: ModuleType,
) -> None:
    async with asgi_client(s3_mod) as client:
        await predict_cold_then_warm(client)


async def predict_cold_then_warm(client: httpx.AsyncClient) -> None:
    cold = await client.post("/predict", json={"inputs": [DIGIT_8]})
    assert cold.status_code == 200
    timings = server_timing(cold.headers.get("server-timing"))
    assert list(timings) == ["load", "infer", "app"]
    assert timings["load"] > 0
    assert_app_covers_the_rest(timings)

    for _ in range(3):
        warm = await client.post("/predict", json={"inputs": [DIGIT_8] * 8})
        assert warm.status_code == 200
        timings = server_timing(warm.headers.get("server-timing"))
        assert list(timings) == ["infer", "app"]
        assert timings["infer"] > 0
        assert_app_covers_the_rest(timings)


@pytest.mark.anyio
async def test_predict_from_a_small_local_file_shows_the_load_too(
    client: httpx.AsyncClient,
) -> None:
    # A 69 KB file loads in a few ms, sometimes before the request that started the load
    # looks at it again; that request still spent the time (see the test below).
    await predict_cold_then_warm(client)


def test_the_caller_that_started_a_load_shows_it_however_fast_the_load() -> None:
    def load() -> int:
        return sum(range(200_000))  # pure Python: keeps the GIL until it returns

    holder: LazyModel[int] = LazyModel(load)
    interval = sys.getswitchinterval()
    # The load thread then runs to its end before the caller's thread resumes: what happens
    # now and then with the reference weights, made certain.
    sys.setswitchinterval(5.0)
    token = timing.begin()
    try:
        assert holder.get() == sum(range(200_000))
        timings = timing.current()
    finally:
        timing.end(token)
        sys.setswitchinterval(interval)
    assert timings is not None
    assert timings.total("load") is not None, "the request that loaded the model shows no load"


@pytest.mark.anyio
async def test_every_request_that_waited_for_the_cold_load_shows_load(
    s3_mod: ModuleType,
) -> None:
    headers: list[str | None] = []

    async def one(client: httpx.AsyncClient) -> None:
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
        assert response.status_code == 200
        headers.append(response.headers.get("server-timing"))

    async with asgi_client(s3_mod) as client, anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(one, client)
    assert s3_mod.service.model.loads_started == 1
    assert [list(server_timing(h)) for h in headers] == [["load", "infer", "app"]] * 10


# --- other answers --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_health_shows_only_app(client: httpx.AsyncClient) -> None:
    for _ in range(2):  # before and after a load
        response = await client.get("/health")
        assert response.status_code == 200
        assert list(server_timing(response.headers.get("server-timing"))) == ["app"]
        await client.post("/predict", json={"inputs": [DIGIT_8]})


@pytest.mark.anyio
async def test_422_shows_only_app(client: httpx.AsyncClient) -> None:
    response = await client.post("/predict", json={"inputs": [[1, 2, 3]]})
    assert response.status_code == 422
    assert list(server_timing(response.headers.get("server-timing"))) == ["app"]


@pytest.mark.anyio
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_413_shows_only_app(client: httpx.AsyncClient, declared: bool) -> None:
    body = json.dumps({"inputs": [DIGIT_8]}).encode()
    body += b" " * (MAX_BODY + 1 - len(body))

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    response = await client.post(
        "/predict",
        content=body if declared else chunks(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert list(server_timing(response.headers.get("server-timing"))) == ["app"]


@pytest.mark.anyio
async def test_503_of_a_failed_load_shows_the_wait(
    s3: CountingS3Server, s3_mod: ModuleType
) -> None:
    s3.fault = failing_gets(*SLOW_DOWN)
    async with asgi_client(s3_mod) as client:
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
    assert response.status_code == 503
    assert list(server_timing(response.headers.get("server-timing"))) == ["load", "app"]


@pytest.mark.anyio
async def test_503_of_a_load_that_outlasts_the_wait_shows_the_wait(
    s3: CountingS3Server, import_handler: ImportHandler
) -> None:
    mod = import_handler(
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),
        LAZYSERVE_LOAD_WAIT="0.2",
    )
    gate = Gate()
    s3.fault = gate
    try:
        async with asgi_client(mod) as client:
            response = await client.post("/predict", json={"inputs": [DIGIT_8]})
    finally:
        gate.open()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    timings = server_timing(response.headers.get("server-timing"))
    assert list(timings) == ["load", "app"]
    assert timings["load"] >= 100  # it waited (LAZYSERVE_LOAD_WAIT=0.2 s) before giving up


# --- through Mangum -------------------------------------------------------------------------------


def test_lambda_http_response_carries_the_header(s3_mod: ModuleType) -> None:
    cold = s3_mod.handler(load_event("http-api-predict"), FakeContext(aws_request_id="r1"))
    assert cold["statusCode"] == 200
    assert list(server_timing(header(cold, "server-timing"))) == ["load", "infer", "app"]

    warm = s3_mod.handler(load_event("http-api-predict"), FakeContext(aws_request_id="r2"))
    assert list(server_timing(header(warm, "server-timing"))) == ["infer", "app"]

    health = s3_mod.handler(load_event("rest-health"), FakeContext(aws_request_id="r3"))
    assert health["statusCode"] == 200
    assert list(server_timing(header(health, "server-timing"))) == ["app"]


# --- GET /model -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_model_metadata_has_the_same_figures(client: httpx.AsyncClient) -> None:
    # The figures are process-wide; count what this test adds.
    before = (await client.get("/model")).json()["requests"].get("infer", {"count": 0})
    last = 0.0
    for _ in range(4):
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
        last = server_timing(response.headers.get("server-timing"))["infer"]
    requests = (await client.get("/model")).json()["requests"]
    infer = requests["infer"]
    assert set(infer) == {"count", "mean_ms", "last_ms"}
    assert infer["count"] == before["count"] + 4
    assert isinstance(infer["count"], int)  # "count": 4, not 4.0
    assert infer["mean_ms"] > 0
    assert infer["last_ms"] == pytest.approx(last, abs=0.002)
    assert requests["load"]["count"] >= 1
    assert requests["load"]["last_ms"] > 0
