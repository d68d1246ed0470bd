"""Many models from one prefix (a LAZYSERVE_MODEL_URI ending in /), through the reference
function and moto's S3 server: 20 models under a budget that fits 5 with a concurrent mixed
workload, names, missing models, a model bigger than the budget, direct and SQS invocations,
`GET /models`, and the same under AWS's runtime client."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

from lazyserve import InvalidInput, ModelNotFound
from tests.helpers import (
    BUCKET,
    DIGIT_8,
    ImportHandler,
    StartFunction,
    asgi_client,
    digits_variant,
    error_of,
    http_body,
    load_event,
    put_object,
)
from tests.s3server import CountingS3Server

PREFIX = "many/"
MODELS = [f"m{i:02d}" for i in range(20)]
VARIANTS = {name: digits_variant(i) for i, name in enumerate(MODELS)}
SHA = {name: hashlib.sha256(data).hexdigest() for name, data in VARIANTS.items()}
SIZE = max(len(data) for data in VARIANTS.values())
BUDGET = 5 * SIZE + SIZE // 2  # room for 5 models, not 6
BODY = {"inputs": [DIGIT_8]}


def key(name: str) -> str:
    return f"{PREFIX}{name}.safetensors"


@pytest.fixture
def many(s3: CountingS3Server) -> CountingS3Server:
    for name, data in VARIANTS.items():
        put_object(s3, key(name), data)
    s3.clear()
    return s3


@pytest.fixture
def mod(many: CountingS3Server, import_handler: ImportHandler) -> ModuleType:
    return import_handler(
        LAZYSERVE_MODEL_URI=f"s3://{BUCKET}/{PREFIX}",
        LAZYSERVE_MEMORY_BUDGET=str(BUDGET),
        LAZYSERVE_S3_PART_SIZE="16384",
    )


def loads_of(s3: CountingS3Server, name: str) -> int:
    """Loads of one model: each starts with the GET of its first part."""
    return sum(
        1 for r in s3.object_gets(BUCKET, key(name)) if (r.range or "").startswith("bytes=0-")
    )


@pytest.mark.anyio
async def test_twenty_models_under_a_budget_of_five_with_a_concurrent_mixed_workload(
    mod: ModuleType, many: CountingS3Server
) -> None:
    pool = mod.service.pool
    rng = random.Random(7)
    # Skewed, as real traffic is: a few hot models, a long tail.
    weights = [8 if i < 3 else 1 for i in range(len(MODELS))]
    plan = rng.choices(MODELS, weights=weights, k=240)
    answers: list[tuple[str, int, Any]] = []
    resident: list[int] = []

    async def worker(names: list[str], client: httpx.AsyncClient) -> None:
        for name in names:
            response = await client.post(f"/models/{name}/predict", json=BODY)
            answers.append((name, response.status_code, response.json()))
            resident.append(pool.reserved)  # measured while the workload runs

    async with asgi_client(mod) as client, anyio.create_task_group() as group:
        for w in range(4):
            group.start_soon(worker, plan[w::4], client)

    # No request failed, and each was answered by the model it named.
    assert [status for _, status, _ in answers] == [200] * len(plan)
    for name, _, body in answers:
        assert body["model"]["sha256"] == SHA[name]
        assert body["predictions"][0]["label"] == 8
    # Never more than the budget resident.
    assert max(resident) <= BUDGET
    assert pool.peak_reserved <= BUDGET
    described = pool.describe()
    assert described["resident_bytes"] <= BUDGET
    assert len([m for m in described["models"] if m["status"] == "loaded"]) <= 5
    # Each model loaded once per residency: every load but the resident ones ended in an
    # eviction (a second load while resident would break this count).
    total_loads = sum(loads_of(many, name) for name in MODELS)
    assert total_loads == described["evictions"] + len(described["models"])
    assert described["evictions"] > 0  # the workload did exercise eviction
    used = Counter(plan)
    for name in MODELS:
        assert loads_of(many, name) <= used[name]


@pytest.mark.anyio
async def test_names_that_cannot_exist_are_404_without_an_s3_call(
    mod: ModuleType, many: CountingS3Server
) -> None:
    async with asgi_client(mod) as client:
        for name in [".hidden", "a%20b", "x@y", "..", "-" * 300 + "+"]:
            response = await client.post(f"/models/{name}/predict", json=BODY)
            assert response.status_code == 404, (name, response.text)
    assert many.requests == []


@pytest.mark.anyio
async def test_a_missing_model_is_a_404_naming_it_and_the_others_keep_serving(
    mod: ModuleType, many: CountingS3Server
) -> None:
    async with asgi_client(mod) as client:
        missing = await client.post("/models/nope/predict", json=BODY)
        good = await client.post("/models/m01/predict", json=BODY)
        listed = (await client.get("/models")).json()
    assert missing.status_code == 404
    detail = missing.json()["detail"]
    assert detail["error"] == "model_not_found"
    assert detail["message"].startswith("no model named 'nope': ")
    assert "NoSuchKey" in detail["message"]
    assert good.status_code == 200
    assert good.json()["model"]["sha256"] == SHA["m01"]
    assert [m["name"] for m in listed["models"]] == ["m01"]
    assert listed["budget_bytes"] == BUDGET


@pytest.mark.anyio
async def test_a_model_bigger_than_the_budget_is_refused_after_one_ranged_get(
    mod: ModuleType, many: CountingS3Server
) -> None:
    put_object(many, key("huge"), b"\0" * (BUDGET + 1))
    many.clear()
    async with asgi_client(mod) as client:
        response = await client.post("/models/huge/predict", json=BODY)
        good = await client.post("/models/m02/predict", json=BODY)
    assert response.status_code == 500  # it never fits: answered until the object changes
    assert response.json()["detail"]["message"] == (
        f"model 'huge' is {BUDGET + 1} bytes, more than the whole memory budget of {BUDGET} "
        "bytes (LAZYSERVE_MEMORY_BUDGET, or what the function's memory leaves after the "
        "imports); raise MemorySize or the budget"
    )
    assert len(many.object_gets(BUCKET, key("huge"))) == 1  # the first part only
    assert good.status_code == 200


@pytest.mark.anyio
async def test_predict_and_model_routes_point_at_the_many_models_routes(mod: ModuleType) -> None:
    async with asgi_client(mod) as client:
        predict = await client.post("/predict", json=BODY)
        model = await client.get("/model")
        health = await client.get("/health")
        schema = (await client.get("/openapi.json")).json()
    assert predict.status_code == 404
    assert "POST /models/{name}/predict" in predict.json()["detail"]["message"]
    # GET /model explains itself too, rather than a bare 404.
    assert model.status_code == 404
    assert model.json()["detail"]["message"] == (
        "this function serves many models (LAZYSERVE_MODEL_URI ends in /): POST "
        "/models/{name}/predict to predict with model NAME, GET /models for the resident ones"
    )
    assert health.json() == {"status": "ok", "model": "not_loaded"}
    route = schema["paths"]["/models/{name}/predict"]["post"]
    assert {"200", "404", "413", "422", "503"} <= set(route["responses"])


def test_direct_and_sqs_invocations_name_the_model(mod: ModuleType) -> None:
    answer = mod.handler({"model": "m03", **BODY}, None)
    assert answer["model"]["sha256"] == SHA["m03"]
    with pytest.raises(InvalidInput, match='"model" field'):
        mod.handler(BODY, None)
    with pytest.raises(ModelNotFound):
        mod.handler({"model": "nope", **BODY}, None)
    records = []
    for i, body in enumerate(
        [{"model": "m04", **BODY}, {"model": "nope", **BODY}, {"model": "m05", **BODY}, BODY]
    ):
        record = dict(load_event("sqs-predict")["Records"][0])
        record["messageId"] = f"message-{i}"
        record["body"] = json.dumps(body)
        records.append(record)
    failures = mod.handler({"Records": records}, None)["batchItemFailures"]
    assert [f["itemIdentifier"] for f in failures] == ["message-1", "message-3"]
    warm = mod.handler({"warmup": True, "model": "m06"}, None)
    assert warm["model"]["sha256"] == SHA["m06"]


def test_many_models_under_the_lambda_runtime_client(
    start_function: StartFunction, many: CountingS3Server
) -> None:
    budget = 2 * SIZE + SIZE // 2
    function = start_function(
        LAZYSERVE_MODEL_URI=f"s3://{BUCKET}/{PREFIX}", LAZYSERVE_MEMORY_BUDGET=str(budget)
    )
    for name in ["m00", "m01", "m00", "m02", "m03"]:
        result = function.invoke({"model": name, **BODY})
        assert result.kind == "response", result.body
        assert result.json()["model"]["sha256"] == SHA[name]
    event = load_event("http-api-predict")
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/models/m04/predict"
    assert http_body(function.invoke(event))["model"]["sha256"] == SHA["m04"]
    listing = load_event("http-api-health")
    listing["rawPath"] = listing["requestContext"]["http"]["path"] = "/models"
    described = http_body(function.invoke(listing))
    assert described["peak_resident_bytes"] <= budget
    assert [m["name"] for m in described["models"]] == ["m03", "m04"]
    assert error_of(function.invoke({"model": "..", **BODY}))["errorType"] == "ModelNotFound"
    # m00 stayed resident for its second call; each model was loaded once.
    assert [loads_of(many, n) for n in ["m00", "m01", "m02", "m03", "m04"]] == [1, 1, 1, 1, 1]
    assert described["evictions"] == 3
