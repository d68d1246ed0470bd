"""The reference function's HTTP endpoints, driven in-process through httpx's ASGI transport, with
the model loaded from moto's S3 server over real HTTP or from the committed weights file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

from tests.helpers import (
    ACCESS_DENIED,
    BUCKET,
    DIGIT_8,
    KEY,
    MAX_BODY,
    PART_SIZE,
    PARTS,
    WEIGHTS,
    WEIGHTS_BYTES,
    WEIGHTS_SHA256,
    Gate,
    ImportHandler,
    asgi_client,
    assert_prediction_shape,
    assert_unavailable,
    assert_unloadable,
    failing_gets,
    held_out_digits,
    recheck_now,
    s3_uri,
    weights_gets,
)
from tests.s3server import CountingS3Server

# --- helpers shared with test_aws.py and test_e2e_uvicorn.py ------------------------------------


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def s3_app(s3: CountingS3Server, import_handler: ImportHandler) -> ModuleType:
    """The reference function loading from moto's S3, 16 KiB per ranged GET."""
    return import_handler(LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_S3_PART_SIZE=str(PART_SIZE))


@pytest.fixture
def local_app(import_handler: ImportHandler) -> ModuleType:
    """The reference function loading the committed weights file."""
    return import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))


@pytest.fixture
async def s3_client(s3_app: ModuleType) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(s3_app) as client:
        yield client


@pytest.fixture
async def local_client(local_app: ModuleType) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(local_app) as client:
        yield client


# --- POST /predict --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_predict_classifies_real_digits_from_local_weights(
    local_client: httpx.AsyncClient,
) -> None:
    rows, labels = held_out_digits(20)
    response = await local_client.post("/predict", json={"inputs": rows})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert_prediction_shape(body, 20)
    right = sum(p["label"] == y for p, y in zip(body["predictions"], labels, strict=True))
    assert right >= 19  # >= 95 %


@pytest.mark.anyio
async def test_predict_from_s3_loads_once_for_many_requests(
    s3: CountingS3Server, s3_app: ModuleType, s3_client: httpx.AsyncClient
) -> None:
    rows, labels = held_out_digits(20)
    for row, label in zip(rows[:5], labels[:5], strict=True):
        response = await s3_client.post("/predict", json={"inputs": [row]})
        assert response.status_code == 200, response.text
        assert_prediction_shape(response.json(), 1)
        assert response.json()["predictions"][0]["label"] == label
    assert weights_gets(s3) == PARTS
    assert s3_app.service.model.loads_started == 1


@pytest.mark.anyio
async def test_concurrent_requests_during_cold_start_share_one_load(
    s3: CountingS3Server, s3_app: ModuleType, s3_client: httpx.AsyncClient
) -> None:
    statuses: list[int] = []
    labels: list[int] = []

    async def one() -> None:
        response = await s3_client.post("/predict", json={"inputs": [DIGIT_8]})
        statuses.append(response.status_code)
        if response.status_code == 200:
            labels.append(response.json()["predictions"][0]["label"])

    async with anyio.create_task_group() as group:
        for _ in range(30):
            group.start_soon(one)
    assert statuses == [200] * 30
    assert labels == [8] * 30
    assert weights_gets(s3) == PARTS
    assert s3_app.service.model.loads_started == 1


@pytest.mark.anyio
async def test_predict_accepts_the_largest_batch(local_client: httpx.AsyncClient) -> None:
    rows, labels = held_out_digits(256)
    response = await local_client.post("/predict", json={"inputs": rows})
    assert response.status_code == 200, response.text
    body = response.json()
    assert_prediction_shape(body, 256)
    right = sum(p["label"] == y for p, y in zip(body["predictions"], labels, strict=True))
    assert right >= 0.95 * 256


@pytest.mark.anyio
async def test_predict_without_content_type_is_read_as_json(
    local_client: httpx.AsyncClient,
) -> None:
    # API Gateway test events and `sam local` send JSON bodies without a Content-Type header.
    response = await local_client.post(
        "/predict", content=json.dumps({"inputs": [DIGIT_8]}).encode()
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == 8


@pytest.mark.anyio
async def test_predict_accepts_the_boundary_values(local_client: httpx.AsyncClient) -> None:
    body = {"inputs": [[0] * 64, [16] * 64, [0.5] * 32 + [15.5] * 32]}
    response = await local_client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    assert_prediction_shape(response.json(), 3)


# --- GET /health, /ready, /model ------------------------------------------------------------------


@pytest.mark.anyio
async def test_health_answers_without_starting_a_load(
    s3: CountingS3Server, s3_app: ModuleType, s3_client: httpx.AsyncClient
) -> None:
    for _ in range(5):
        response = await s3_client.get("/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "model": "not_loaded"}
    assert weights_gets(s3) == 0
    assert s3_app.service.model.loads_started == 0

    assert (await s3_client.post("/predict", json={"inputs": [DIGIT_8]})).status_code == 200
    response = await s3_client.get("/health")
    assert response.json() == {"status": "ok", "model": "loaded"}


@pytest.mark.anyio
async def test_ready_starts_the_load_and_answers_200(
    s3: CountingS3Server, s3_app: ModuleType, s3_client: httpx.AsyncClient
) -> None:
    response = await s3_client.get("/ready")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "model": "loaded"}
    assert weights_gets(s3) == PARTS
    # Ready again: no second load.
    assert (await s3_client.get("/ready")).status_code == 200
    assert weights_gets(s3) == PARTS
    assert s3_app.service.model.loads_started == 1


@pytest.mark.anyio
async def test_ready_is_500_while_the_model_cannot_load_then_recovers(
    s3: CountingS3Server, s3_client: httpx.AsyncClient, s3_app: ModuleType
) -> None:
    s3.fault = failing_gets(*ACCESS_DENIED)
    response = await s3_client.get("/ready")
    assert_unloadable(
        response.status_code, response.headers, response.json(), BUCKET, KEY, "AccessDenied"
    )
    assert (await s3_client.get("/health")).json() == {"status": "ok", "model": "failed"}
    # Denied access is not retried by every request: it is answered until a look at the
    # object shows something else (here, once the role may read it).
    s3.clear()
    response = await s3_client.get("/ready")
    assert response.status_code == 500
    assert weights_gets(s3) == 0

    s3.fault = None
    recheck_now(s3_app.service.model)
    response = await s3_client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "loaded"}


@pytest.mark.anyio
async def test_ready_is_503_with_short_retry_after_while_a_load_outlasts_load_wait(
    s3: CountingS3Server, gate: Gate, import_handler: ImportHandler
) -> None:
    mod = import_handler(
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),
        LAZYSERVE_LOAD_WAIT="0.2",
    )
    async with asgi_client(mod) as client:
        response = await client.get("/ready")
        assert_unavailable(
            response.status_code, response.headers, response.json(), "loading", retry_after="2"
        )
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
        assert_unavailable(
            response.status_code, response.headers, response.json(), "loading", retry_after="2"
        )
        assert (await client.get("/health")).json() == {"status": "ok", "model": "loading"}

        gate.open()
        # The load carried on after the waiters gave up; the same load now serves.
        with anyio.fail_after(60):
            while (await client.get("/health")).json()["model"] == "loading":
                await anyio.sleep(0.05)
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == 8
    assert mod.service.model.loads_started == 1
    assert weights_gets(s3) == PARTS


@pytest.mark.anyio
async def test_model_metadata_after_an_s3_load(
    s3: CountingS3Server, s3_client: httpx.AsyncClient
) -> None:
    before = (await s3_client.get("/model")).json()
    assert before["status"] == "not_loaded"
    assert before["source"] == s3_uri()
    assert before["loads"] == 0
    assert before["sha256"] is None
    assert weights_gets(s3) == 0  # /model does not start a load either

    assert (await s3_client.post("/predict", json={"inputs": [DIGIT_8]})).status_code == 200
    response = await s3_client.get("/model")
    assert response.status_code == 200
    meta = response.json()
    assert meta["status"] == "loaded"
    assert meta["source"] == s3_uri()
    assert meta["sha256"] == WEIGHTS_SHA256
    assert meta["size_bytes"] == len(WEIGHTS_BYTES)
    assert meta["format"] == "safetensors"
    assert meta["etag"] == f'"{hashlib.md5(WEIGHTS_BYTES).hexdigest()}"'
    assert meta["version_id"] is None  # the bucket has no versioning
    timings = {k: meta[k] for k in ("fetch_seconds", "build_seconds", "total_seconds")}
    assert all(isinstance(v, float) and v >= 0 for v in timings.values())
    assert timings["total_seconds"] >= timings["fetch_seconds"]
    assert isinstance(meta["loaded_at"], str) and meta["loaded_at"].endswith("+00:00")
    assert meta["loads"] == 1
    assert meta["last_error"] is None


@pytest.mark.anyio
async def test_model_metadata_after_a_local_load(local_client: httpx.AsyncClient) -> None:
    assert (await local_client.get("/ready")).status_code == 200
    meta = (await local_client.get("/model")).json()
    assert meta["source"] == str(WEIGHTS)
    assert meta["sha256"] == WEIGHTS_SHA256
    assert meta["size_bytes"] == len(WEIGHTS_BYTES)
    assert meta["format"] == "safetensors"
    assert meta["loads"] == 1


# --- 422: invalid bodies --------------------------------------------------------------------------

ROW63 = ",".join(["1"] * 63)


def _rows(*rows: str) -> bytes:
    return ('{"inputs": [' + ",".join(f"[{r}]" for r in rows) + "]}").encode()


def _value(token: str, column: int = 5) -> bytes:
    cells = ["1"] * 64
    cells[column] = token
    return _rows(",".join(["2"] * 64), ",".join(cells))


INVALID_BODIES: dict[str, tuple[bytes, str, list[Any]]] = {
    # name: (body, content type, the loc FastAPI must name)
    "not-json": (b'{"inputs": [[1, 2,', "application/json", ["body"]),
    "text-plain": (json.dumps({"inputs": [DIGIT_8]}).encode(), "text/plain", ["body"]),
    "empty-body": (b"", "application/json", ["body"]),
    "no-inputs-key": (json.dumps({"input": [DIGIT_8]}).encode(), "application/json", ["body"]),
    "inputs-not-a-list": (b'{"inputs": 5}', "application/json", ["body", "inputs"]),
    "row-of-63": (_rows(",".join(["1"] * 64), ROW63), "application/json", ["body", "inputs", 1]),
    "row-of-65": (_rows(ROW63 + ",1,1"), "application/json", ["body", "inputs", 0]),
    "zero-rows": (b'{"inputs": []}', "application/json", ["body", "inputs"]),
    "257-rows": (_rows(*[",".join(["1"] * 64)] * 257), "application/json", ["body", "inputs"]),
    "value-17": (_value("17"), "application/json", ["body", "inputs", 1, 5]),
    "value-minus-1": (_value("-1"), "application/json", ["body", "inputs", 1, 5]),
    "string-5": (_value('"5"'), "application/json", ["body", "inputs", 1, 5]),
    "null": (_value("null"), "application/json", ["body", "inputs", 1, 5]),
    "true": (_value("true"), "application/json", ["body", "inputs", 1, 5]),
    "NaN-token": (_value("NaN"), "application/json", ["body", "inputs", 1, 5]),
    "Infinity-token": (_value("Infinity"), "application/json", ["body", "inputs", 1, 5]),
    "minus-Infinity-token": (_value("-Infinity"), "application/json", ["body", "inputs", 1, 5]),
    "1e400": (_value("1e400"), "application/json", ["body", "inputs", 1, 5]),
    "nested-too-deep": (
        b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "application/json",
        ["body"],
    ),
    "top-level-nested-too-deep": (b"[" * 100_000 + b"]" * 100_000, "application/json", ["body"]),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", INVALID_BODIES)
async def test_invalid_body_is_422_naming_the_field(
    local_client: httpx.AsyncClient, case: str
) -> None:
    body, content_type, loc = INVALID_BODIES[case]
    response = await local_client.post(
        "/predict", content=body, headers={"content-type": content_type}
    )
    assert response.status_code == 422, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    assert any(error["loc"][: len(loc)] == loc for error in detail), detail
    assert all(isinstance(error["msg"], str) and error["msg"] for error in detail)


@pytest.mark.anyio
async def test_invalid_body_is_422_even_while_the_model_cannot_load(
    s3: CountingS3Server, s3_client: httpx.AsyncClient
) -> None:
    # A client's mistake is the client's to fix: telling it "model unavailable, retry" would
    # have it resend the same bad body forever.
    s3.fault = failing_gets(*ACCESS_DENIED)
    response = await s3_client.post("/predict", json={"inputs": [[1, 2, 3]]})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "inputs", 0]


# --- 413: body over Lambda's payload limit --------------------------------------------------------


@pytest.mark.anyio
async def test_body_over_6_mib_is_413_json(local_client: httpx.AsyncClient) -> None:
    body = json.dumps({"inputs": [DIGIT_8]}).encode()
    body += b" " * (MAX_BODY + 1 - len(body))
    response = await local_client.post(
        "/predict", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"
    assert "detail" in response.json()


@pytest.mark.anyio
async def test_body_of_exactly_6_mib_is_served(local_client: httpx.AsyncClient) -> None:
    body = json.dumps({"inputs": [DIGIT_8]}).encode()
    body += b" " * (MAX_BODY - len(body))
    assert len(body) == 6_291_456
    response = await local_client.post(
        "/predict", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text[:500]
    assert response.json()["predictions"][0]["label"] == 8


# --- 503: the model cannot load -------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "code", "message"),
    [(503, "SlowDown", "Please reduce your request rate."),
     (500, "InternalError", "We encountered an internal error. Please try again.")],
    ids=["503-SlowDown", "500-InternalError"],
)  # fmt: skip
async def test_s3_failure_is_503_then_the_next_request_retries(
    s3: CountingS3Server,
    s3_app: ModuleType,
    s3_client: httpx.AsyncClient,
    status: int,
    code: str,
    message: str,
) -> None:
    s3.fault = failing_gets(status, code, message)
    response = await s3_client.post("/predict", json={"inputs": [DIGIT_8]})
    assert_unavailable(response.status_code, response.headers, response.json(), BUCKET, KEY, code)
    meta = (await s3_client.get("/model")).json()
    assert meta["status"] == "failed"
    assert code in meta["last_error"]

    s3.fault = None
    s3.clear()
    response = await s3_client.post("/predict", json={"inputs": [DIGIT_8]})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == 8
    assert weights_gets(s3) == PARTS
    meta = (await s3_client.get("/model")).json()
    assert meta["status"] == "loaded"
    assert meta["loads"] == 1
    assert meta["load_attempts"] == 2
    assert meta["last_error"] is None
    assert s3_app.service.model.loads_started == 2


@pytest.mark.anyio
async def test_missing_object_is_500_naming_no_such_key(
    s3: CountingS3Server, import_handler: ImportHandler
) -> None:
    missing = "digits/missing.safetensors"
    mod = import_handler(LAZYSERVE_MODEL_URI=f"s3://{BUCKET}/{missing}")
    async with asgi_client(mod) as client:
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
    assert_unloadable(
        response.status_code, response.headers, response.json(), BUCKET, missing, "NoSuchKey"
    )


@pytest.mark.anyio
async def test_missing_bucket_is_500_naming_no_such_bucket(
    s3: CountingS3Server, import_handler: ImportHandler
) -> None:
    mod = import_handler(LAZYSERVE_MODEL_URI="s3://no-such-bucket-here/digits.safetensors")
    async with asgi_client(mod) as client:
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
    assert_unloadable(
        response.status_code, response.headers, response.json(), "no-such-bucket-here",
        "NoSuchBucket",
    )  # fmt: skip


@pytest.mark.anyio
async def test_sha256_mismatch_is_500_naming_both_digests(
    s3: CountingS3Server, import_handler: ImportHandler
) -> None:
    expected = "ab" * 32
    mod = import_handler(LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_MODEL_SHA256=expected)
    async with asgi_client(mod) as client:
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
        assert_unloadable(
            response.status_code, response.headers, response.json(), expected, WEIGHTS_SHA256
        )
        assert (await client.get("/health")).json()["model"] == "failed"


@pytest.mark.anyio
async def test_missing_local_file_is_500_naming_the_path(
    tmp_path: Any, import_handler: ImportHandler
) -> None:
    path = tmp_path / "nowhere.safetensors"
    mod = import_handler(LAZYSERVE_MODEL_URI=str(path))
    async with asgi_client(mod) as client:
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
        assert_unloadable(response.status_code, response.headers, response.json(), str(path))
        # The file appears: the next look sees it, and the next request loads it.
        path.write_bytes(WEIGHTS_BYTES)
        recheck_now(mod.service.model)
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
        assert response.status_code == 200, response.text
